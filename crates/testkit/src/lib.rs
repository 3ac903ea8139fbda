//! hongbao-testkit: throwaway PostgreSQL clusters for tests.
//!
//! [`PgCluster::start`] runs `initdb` in a fresh temp dir, starts a server on a free loopback
//! port (its unix socket dir inside the same temp dir), and creates a fresh database; dropping
//! the cluster stops the server at once and removes the dir. As root, the server binaries run
//! as the `postgres` OS user, because PostgreSQL refuses to run as root.
//!
//! Everything here fails loudly: a cluster that cannot start panics with its server log, so a
//! test that needs PostgreSQL never passes by skipping. This crate must never touch a server
//! or a directory that it did not create, in this process or in a test process that died
//! without cleaning up.

use std::fmt::Write as _;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The database [`PgCluster::start`] creates, and the one [`PgCluster::url`] names.
pub const DATABASE: &str = "hongbao_test";

/// How the temp dirs of clusters start, so that orphans can be found.
const DIR_PREFIX: &str = "hongbao-pg-";

/// The file in a cluster's dir that names the process owning it.
const OWNER_FILE: &str = "owner.pid";

/// What `pg_ctl` waits for a start, stop or promotion, in seconds. Crash recovery after a
/// `kill -9` of a busy cluster on a loaded 2-core machine takes seconds; minutes mean a hang.
const PG_CTL_WAIT_S: u32 = 120;

/// Fresh ports `start` tries: another process may take a probed port before the server binds
/// it, and that race is the only start failure worth a retry.
const START_ATTEMPTS: u32 = 5;

/// How long standbys get to connect and catch up before a wait for them fails.
const REPLICATION_WAIT: Duration = Duration::from_secs(60);

/// How long killed server processes get to disappear.
const KILL_WAIT: Duration = Duration::from_secs(30);

/// `max_connections` of every cluster: a few stores per test, each with a writer and a pool,
/// plus the engine tests' sets, stay far below it.
const MAX_CONNECTIONS: u32 = 200;

/// A PostgreSQL server this process started, with its data dir in a temp dir of its own.
///
/// Not `Clone`: the value owns the server. Dropping it stops the server (`-m immediate`) and
/// removes the dir.
#[derive(Debug)]
pub struct PgCluster {
    bin: PathBuf,
    /// `None` only while dropping.
    dir: Option<tempfile::TempDir>,
    port: u16,
    database: String,
    /// `primary`, or `s1`, `s2`, … for standbys (their `application_name` too).
    name: String,
    running: bool,
}

impl PgCluster {
    /// Starts a fresh cluster with `fsync=on`, `synchronous_commit=on` and
    /// `max_connections=200`, and creates the database [`DATABASE`] in it.
    pub fn start() -> PgCluster {
        let mut cluster = PgCluster::init("primary");
        cluster.start_on_free_port();
        cluster.create_database(DATABASE);
        cluster
    }

    /// Starts a primary and `standbys` streaming standbys made with `pg_basebackup -R`, named
    /// `s1` … `sN` (their `application_name`), with `synchronous_standby_names = 'ANY 1 (s1,
    /// s2, …)'` on the primary: a commit returns once one standby has flushed it. Returns
    /// when every standby is streaming. The standbys hold the database [`DATABASE`] too.
    pub fn start_primary_with_standbys(standbys: u32) -> (PgCluster, Vec<PgCluster>) {
        assert!(standbys >= 1, "a primary with standbys needs at least one standby");
        let primary = PgCluster::start();
        let mut list = Vec::new();
        for k in 1..=standbys {
            list.push(primary.base_backup(&format!("s{k}")));
        }
        let names: Vec<String> = list.iter().map(|s| s.name.clone()).collect();
        primary.psql_in(
            "postgres",
            &format!("ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 ({})'", names.join(", ")),
        );
        primary.psql_in("postgres", "SELECT pg_reload_conf()");
        primary.wait_for(REPLICATION_WAIT, "every standby to stream in the quorum", || {
            let n = primary.psql_in(
                "postgres",
                "SELECT count(*) FROM pg_stat_replication \
                 WHERE state = 'streaming' AND sync_state IN ('quorum', 'sync')",
            );
            n == standbys.to_string()
        });
        (primary, list)
    }

    /// `postgres://postgres@127.0.0.1:PORT/hongbao_test`.
    pub fn url(&self) -> String {
        self.url_for(&self.database)
    }

    /// The URL of another database on this cluster.
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// `primary`, or the standby's name (`s1`, …), which a promotion keeps.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The temp dir that holds the data dir, the socket dir and the server log.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("cluster dir").path()
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Creates another database and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.psql_in("postgres", &format!("CREATE DATABASE {name}"));
        self.url_for(name)
    }

    /// Runs SQL with `psql` on [`DATABASE`] and returns its unaligned, tuples-only output,
    /// trimmed. Panics with psql's error and the server log if it fails.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in(&self.database, sql)
    }

    /// [`PgCluster::psql`] on another database.
    pub fn psql_in(&self, database: &str, sql: &str) -> String {
        match self.try_psql_in(database, sql) {
            Ok(out) => out,
            Err(e) => self.fail(&format!("psql on {database} failed: {e}\nSQL: {sql}")),
        }
    }

    /// Like [`PgCluster::psql`], but a failure (server down, read-only standby, bad SQL) is a
    /// value: tests use it to show that something is refused.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        self.try_psql_in(&self.database, sql)
    }

    fn try_psql_in(&self, database: &str, sql: &str) -> Result<String, String> {
        // psql is a client: it runs as whoever we are, over TCP with trust authentication.
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(database)
            .arg("-c")
            .arg(sql)
            .env("PGCONNECT_TIMEOUT", "10")
            .current_dir(self.dir())
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }

    /// Kills the postmaster and every server process with SIGKILL, like a machine that lost
    /// power (the page cache aside), and waits until they are gone. [`PgCluster::restart`]
    /// starts it again through crash recovery.
    pub fn kill9(&mut self) {
        if !self.running {
            return;
        }
        let Some(pid) = self.postmaster_pid() else {
            self.fail("kill9: no postmaster.pid");
        };
        let mut pids = children_of(pid);
        pids.push(pid);
        // Some may have exited on their own already, which fails `kill`; what matters is
        // that none is left, checked below.
        let _ = Command::new("kill").arg("-9").args(pids.iter().map(u32::to_string)).status();
        let deadline = Instant::now() + KILL_WAIT;
        while pids.iter().any(|&p| alive(p)) || TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            if Instant::now() > deadline {
                self.fail(&format!("kill9: server processes {pids:?} still alive"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The dead postmaster's lock files name its pid, and a zombie not yet reaped still
        // owns that pid, so the next start would take it for a live server. After a real power
        // loss no such process exists: remove them as a reboot would make them stale.
        let locks = [
            self.data().join("postmaster.pid"),
            self.socket_dir().join(format!(".s.PGSQL.{}.lock", self.port)),
            self.socket_dir().join(format!(".s.PGSQL.{}", self.port)),
        ];
        for path in locks {
            let _ = std::fs::remove_file(path);
        }
        self.running = false;
    }

    /// Stops the server cleanly (`pg_ctl -m fast stop`): a shutdown checkpoint, then exit.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.pg_ctl(&["-m", "fast", "stop"]);
        self.running = false;
    }

    /// Starts a stopped or killed server again on the same port; after [`PgCluster::kill9`]
    /// this runs crash recovery.
    pub fn restart(&mut self) {
        assert!(!self.running, "restart of a running cluster");
        if let Err(log) = self.try_pg_ctl_start() {
            self.fail(&format!("restart failed:\n{log}"));
        }
        self.running = true;
    }

    /// Promotes this standby to a primary that accepts writes (`pg_ctl promote`, which waits
    /// for the promotion to finish).
    pub fn promote(&mut self) {
        assert!(self.running, "promote of a stopped cluster");
        self.pg_ctl(&["promote"]);
        self.wait_for(REPLICATION_WAIT, "the promotion to finish", || {
            self.try_psql_in("postgres", "SELECT pg_is_in_recovery()").as_deref() == Ok("f")
        });
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("server.log"))
            .unwrap_or_else(|e| format!("(no server log: {e})"))
    }

    fn data(&self) -> PathBuf {
        self.dir().join("data")
    }

    fn socket_dir(&self) -> PathBuf {
        self.dir().join("sock")
    }

    /// A temp dir the server user owns, and an empty data dir in it made by `initdb`.
    fn init(name: &str) -> PgCluster {
        let cluster = PgCluster::empty(name);
        let out = cluster
            .server_command("initdb")
            .arg("-D")
            .arg(cluster.data())
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync"])
            .output()
            .expect("cannot run initdb");
        if !out.status.success() {
            panic!("initdb failed:\n{}", output_text(&out));
        }
        cluster.append_conf(
            "postgresql.conf",
            &format!(
                "\n# hongbao-testkit\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
                 fsync = on\nsynchronous_commit = on\nmax_connections = {MAX_CONNECTIONS}\n\
                 shared_buffers = 32MB\n",
                cluster.socket_dir().display()
            ),
        );
        cluster
    }

    fn empty(name: &str) -> PgCluster {
        static REAPED: OnceLock<()> = OnceLock::new();
        REAPED.get_or_init(reap_orphans);
        let dir = tempfile::Builder::new().prefix(DIR_PREFIX).tempdir().expect("cannot create a temp dir");
        // Which process owns the cluster, for `reap_orphans` in a later run.
        std::fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())
            .expect("cannot write the owner file");
        let cluster = PgCluster {
            bin: bin_dir().to_owned(),
            dir: Some(dir),
            port: 0,
            database: DATABASE.to_owned(),
            name: name.to_owned(),
            running: false,
        };
        std::fs::create_dir(cluster.socket_dir()).expect("cannot create the socket dir");
        if let Some((uid, gid)) = server_user() {
            for path in [cluster.dir().to_owned(), cluster.socket_dir()] {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .unwrap_or_else(|e| panic!("cannot give {} to the postgres user: {e}", path.display()));
            }
        }
        cluster
    }

    /// Picks a free loopback port and starts; retries with another port when the probed one
    /// was taken in between.
    fn start_on_free_port(&mut self) {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            self.port = free_port();
            self.append_conf("postgresql.conf", &format!("port = {}\n", self.port));
            match self.try_pg_ctl_start() {
                Ok(()) => {
                    self.running = true;
                    return;
                }
                Err(log) if log.contains("could not bind") || log.contains("already in use") => last = log,
                Err(log) => self.fail(&format!("the server did not start:\n{log}")),
            }
        }
        panic!("no free port after {START_ATTEMPTS} attempts:\n{last}");
    }

    fn try_pg_ctl_start(&self) -> Result<(), String> {
        let out = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir().join("server.log"))
            .args(["-w", "-t", &PG_CTL_WAIT_S.to_string(), "start"])
            .output()
            .expect("cannot run pg_ctl");
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}\n--- server log ---\n{}", output_text(&out), self.log()))
        }
    }

    fn pg_ctl(&self, args: &[&str]) {
        let out = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-t", &PG_CTL_WAIT_S.to_string()])
            .args(args)
            .output()
            .expect("cannot run pg_ctl");
        if !out.status.success() {
            self.fail(&format!("pg_ctl {args:?} failed:\n{}", output_text(&out)));
        }
    }

    /// A standby of this cluster named `name`, made with `pg_basebackup -R` and started.
    fn base_backup(&self, name: &str) -> PgCluster {
        let mut standby = PgCluster::empty(name);
        standby.database = self.database.clone();
        let out = standby
            .server_command("pg_basebackup")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
                "--no-sync",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-D")
            .arg(standby.data())
            .output()
            .expect("cannot run pg_basebackup");
        if !out.status.success() {
            self.fail(&format!("pg_basebackup for {name} failed:\n{}", output_text(&out)));
        }
        // The copied postgresql.conf carries the primary's socket dir; later lines win. A
        // standby never waits for standbys of its own, also once promoted.
        standby.append_conf(
            "postgresql.conf",
            &format!(
                "\n# hongbao-testkit standby {name}\nunix_socket_directories = '{}'\n\
                 synchronous_standby_names = ''\n",
                standby.socket_dir().display()
            ),
        );
        // After the primary_conninfo `-R` wrote: the same file, so this line wins.
        standby.append_conf(
            "postgresql.auto.conf",
            &format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={name}'\n",
                self.port
            ),
        );
        standby.start_on_free_port();
        standby
    }

    fn append_conf(&self, file: &str, text: &str) {
        use std::io::Write as _;
        let path = self.data().join(file);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        f.write_all(text.as_bytes()).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }

    /// A server binary, run as the `postgres` user when we are root.
    fn server_command(&self, program: &str) -> Command {
        as_server_user(&self.bin.join(program), self.dir())
    }

    fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    fn wait_for(&self, timeout: Duration, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            if Instant::now() > deadline {
                self.fail(&format!("timed out after {timeout:?} waiting for {what}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn fail(&self, msg: &str) -> ! {
        panic!(
            "PostgreSQL cluster {} on port {}: {msg}\n--- server log ---\n{}",
            self.name,
            self.port,
            self.log()
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let stopped = self
                .server_command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-w", "-t", &PG_CTL_WAIT_S.to_string(), "-m", "immediate", "stop"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !stopped && !std::thread::panicking() {
                self.kill9();
            }
            self.running = false;
        }
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

/// Stops and removes the clusters of test processes that died without dropping them (an
/// abort, a SIGKILL, a timeout): their servers would otherwise run until the machine stops.
/// Only dirs this crate made, with an owner file naming a process that no longer exists.
fn reap_orphans() {
    let Ok(list) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in list.flatten() {
        let dir = e.path();
        let ours = e.file_name().to_str().is_some_and(|n| n.starts_with(DIR_PREFIX));
        let owner = std::fs::read_to_string(dir.join(OWNER_FILE)).ok().and_then(|s| s.trim().parse().ok());
        let Some(owner) = owner.filter(|_| ours) else { continue };
        if alive(owner) {
            continue;
        }
        let data = dir.join("data");
        if data.join("postmaster.pid").exists() {
            let mut stop = as_server_user(&bin_dir().join("pg_ctl"), &dir);
            let _ = stop.arg("-D").arg(&data).args(["-m", "immediate", "stop"]).output();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A server binary, run as the `postgres` user when we are root, in `cwd`: the caller's own
/// cwd may be closed to the postgres user, a cluster dir never is.
fn as_server_user(program: &Path, cwd: &Path) -> Command {
    let mut cmd = if server_user().is_some() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.current_dir(cwd);
    cmd
}

/// The newest `/usr/lib/postgresql/N/bin` (Debian's layout), or `HONGBAO_PG_BIN` when set.
fn bin_dir() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(dir) = std::env::var_os("HONGBAO_PG_BIN") {
            return PathBuf::from(dir);
        }
        let root = Path::new("/usr/lib/postgresql");
        let newest = std::fs::read_dir(root)
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let e = e.ok()?;
                let version: u32 = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((version, bin))
            })
            .max();
        match newest {
            Some((_, bin)) => bin,
            None => panic!(
                "no PostgreSQL server binaries under {}: install them (apt-get install postgresql) \
                 or set HONGBAO_PG_BIN",
                root.display()
            ),
        }
    })
}

/// The `postgres` user's (uid, gid) when we are root and must hand the server to it; `None`
/// when we are not root and run the server as ourselves.
fn server_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(|| {
        let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        if !root {
            return None;
        }
        let passwd = std::fs::read_to_string("/etc/passwd").expect("cannot read /etc/passwd");
        let ids = passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || f[0] != "postgres" {
                return None;
            }
            Some((f[2].parse::<u32>().ok()?, f[3].parse::<u32>().ok()?))
        });
        Some(ids.expect("running as root, but there is no postgres user: install the postgresql package"))
    })
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("cannot bind a loopback port");
    listener.local_addr().expect("local addr").port()
}

/// Every process whose parent is `pid` (the postmaster's backends and helpers).
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if stat_field(child, 1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// A process that exists and is not a zombie waiting to be reaped.
fn alive(pid: u32) -> bool {
    matches!(stat_field(pid, 0).as_deref(), Some(state) if state != "Z" && state != "X")
}

/// Field `i` of `/proc/PID/stat` counted after the command name: 0 is the state, 1 the
/// parent pid. The command name may hold spaces and parentheses, so fields start after the
/// last `)`.
fn stat_field(pid: u32, i: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(i).map(str::to_owned)
}

fn output_text(out: &Output) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    s
}
