//! Configuration: flags, then `HONGBAO_*` environment variables, then a TOML file, then
//! defaults. Keys come from the environment or the file; with neither, `serve` generates them
//! once and keeps them in the data dir. The user-token secret comes from a flag, the
//! environment or the file; without one, user tokens are off.
//!
//! Secrets never reach a log or an error message: `Secret` prints as `Secret(..)`, and clap is
//! told not to show the environment's value in `--help`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use hongbao_core::Limits;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `hongbao serve` options. Each is also read from `HONGBAO_<NAME>`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to serve HTTP on [default: 127.0.0.1:8080]
    #[arg(long, env = "HONGBAO_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data dir: SQLite files (one per set) and generated keys [default: ./hongbao-data]
    #[arg(long, env = "HONGBAO_DATA")]
    pub data: Option<PathBuf>,
    /// TOML config file; flags and environment variables override it
    #[arg(long, env = "HONGBAO_CONFIG")]
    pub config: Option<PathBuf>,
    /// `sqlite` (default) or a postgres:// URL
    #[arg(long, env = "HONGBAO_STORE")]
    pub store: Option<String>,
    /// postgres:// URL of a streaming standby of the store: balance, history and packet-detail
    /// queries read there instead of the primary, and may trail acknowledged writes by the
    /// standby's replay lag (milliseconds, normally). Needs a postgres:// store
    #[arg(long, env = "HONGBAO_REPLICA")]
    pub replica: Option<String>,
    /// Sets (shards, one engine thread each); fixed for the life of a data dir [default: 1]
    #[arg(long, env = "HONGBAO_SETS")]
    pub sets: Option<u32>,
    /// SQLite only: `on` commits each batch to an append-only journal and folds it into the
    /// SQLite file in the background; `off` commits each batch straight to SQLite [default: on]
    #[arg(long, env = "HONGBAO_JOURNAL", value_enum)]
    pub journal: Option<Switch>,
    /// Seconds a grabbed share waits to be opened [default: 30]
    #[arg(long, env = "HONGBAO_HOLD_S")]
    pub hold_s: Option<i64>,
    /// Commands waiting per set before new work is refused with 503 [default: 16384]
    #[arg(long, env = "HONGBAO_QUEUE_DEPTH")]
    pub queue_depth: Option<usize>,
    /// Most commands per batch (one store transaction) [default: 2048]
    #[arg(long, env = "HONGBAO_BATCH_MAX")]
    pub batch_max: Option<usize>,
    /// Microseconds a busy set leaves between the starts of its commits, gathering commands
    /// meanwhile: fewer, larger fsyncs under load; 0 commits whenever the queue is empty
    /// [default: 1000]
    #[arg(long, env = "HONGBAO_COMMIT_SPACING_US")]
    pub commit_spacing_us: Option<u64>,
    /// Grabs, opens and claims per second per user; 0 turns the limit off [default: 20]
    #[arg(long, env = "HONGBAO_USER_RATE")]
    pub user_rate: Option<u32>,
    /// Log format [default: text]
    #[arg(long, env = "HONGBAO_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, as in RUST_LOG (e.g. `debug`, `hongbao_api=debug`) [default: RUST_LOG, or info]
    #[arg(long, env = "HONGBAO_LOG")]
    pub log: Option<String>,
    /// Secret (at least 32 bytes) that signs user tokens (HS256 JWTs); user tokens are refused
    /// without one. Prefer the environment or the config file: flags show in `ps`
    #[arg(long, env = "HONGBAO_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<Secret>,
}

/// A secret: kept as given, shown to no one. `Debug` prints no part of it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The TOML file: every option, plus the keys and the limits.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub data: Option<PathBuf>,
    pub store: Option<String>,
    pub replica: Option<String>,
    pub sets: Option<u32>,
    pub journal: Option<Switch>,
    pub hold_s: Option<i64>,
    pub queue_depth: Option<usize>,
    pub batch_max: Option<usize>,
    pub commit_spacing_us: Option<u64>,
    pub user_rate: Option<u32>,
    pub log_format: Option<LogFormat>,
    pub log: Option<String>,
    pub token_secret: Option<Secret>,
    pub api_key: Option<String>,
    pub admin_key: Option<String>,
    #[serde(default)]
    pub limits: Option<Limits>,
}

impl FileConfig {
    /// The file at `path`, or an empty one when there is none.
    pub fn read(path: Option<&Path>) -> Result<FileConfig, String> {
        let Some(path) = path else { return Ok(FileConfig::default()) };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str::<FileConfig>(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }
}

pub fn check_sets(sets: u32) -> Result<u32, String> {
    if (1..=hongbao_core::ids::SETS_MAX).contains(&sets) {
        Ok(sets)
    } else {
        Err(format!("sets must be between 1 and {}", hongbao_core::ids::SETS_MAX))
    }
}

pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Everything `serve` needs, merged and checked.
#[derive(Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub store: Option<String>,
    /// Where queries read, when not the store itself.
    pub replica: Option<String>,
    pub sets: u32,
    /// SQLite: journal in front of the file.
    pub journal: bool,
    pub limits: Limits,
    pub queue_depth: usize,
    pub batch_max: usize,
    pub commit_spacing: Duration,
    pub user_rate: u32,
    pub log_format: LogFormat,
    /// The log filter; `None` leaves it to RUST_LOG.
    pub log: Option<String>,
    /// Signs user tokens; `None`: user tokens are off.
    pub token_secret: Option<Secret>,
    pub file_api_key: Option<String>,
    pub file_admin_key: Option<String>,
}

/// Bounds on the tunables, so a typo cannot make a set useless or unbounded.
const QUEUE_DEPTH_MAX: usize = 1 << 20;
const BATCH_MAX_MAX: usize = 65_536;
/// A spacing past this would make every claim under load wait longer than a slow disk's flush.
const COMMIT_SPACING_US_MAX: u64 = 100_000;

impl Settings {
    pub fn resolve(args: ServeArgs) -> Result<Settings, String> {
        let file = FileConfig::read(args.config.as_deref())?;
        let mut limits = file.limits.unwrap_or_default();
        if let Some(hold_s) = args.hold_s.or(file.hold_s) {
            if !(1..=3600).contains(&hold_s) {
                return Err("hold_s must be between 1 and 3600".into());
            }
            limits.hold_s = hold_s;
        }
        let sets = check_sets(args.sets.or(file.sets).unwrap_or(1))?;
        let store = args.store.or(file.store);
        let replica = args.replica.or(file.replica);
        if replica.is_some() && !store.as_deref().is_some_and(is_postgres_url) {
            return Err("replica needs a postgres:// store".into());
        }
        let queue_depth = args.queue_depth.or(file.queue_depth).unwrap_or(16_384);
        if !(1..=QUEUE_DEPTH_MAX).contains(&queue_depth) {
            return Err(format!("queue_depth must be between 1 and {QUEUE_DEPTH_MAX}"));
        }
        let batch_max = args.batch_max.or(file.batch_max).unwrap_or(2_048);
        if !(1..=BATCH_MAX_MAX).contains(&batch_max) {
            return Err(format!("batch_max must be between 1 and {BATCH_MAX_MAX}"));
        }
        let commit_spacing_us = args
            .commit_spacing_us
            .or(file.commit_spacing_us)
            .unwrap_or(hongbao_engine::COMMIT_SPACING_DEFAULT.as_micros() as u64);
        if commit_spacing_us > COMMIT_SPACING_US_MAX {
            return Err(format!("commit_spacing_us must be between 0 and {COMMIT_SPACING_US_MAX}"));
        }
        // An empty secret (say `HONGBAO_TOKEN_SECRET=`) is no secret: tokens stay off.
        let token_secret = args.token_secret.or(file.token_secret).filter(|s| !s.0.is_empty());
        if let Some(secret) = &token_secret {
            if secret.expose().len() < hongbao_api::TOKEN_SECRET_BYTES_MIN {
                return Err(format!(
                    "token_secret must be at least {} bytes",
                    hongbao_api::TOKEN_SECRET_BYTES_MIN
                ));
            }
        }
        Ok(Settings {
            listen: args.listen.or(file.listen).unwrap_or_else(|| "127.0.0.1:8080".parse().expect("valid")),
            data: args.data.or(file.data).unwrap_or_else(|| PathBuf::from("hongbao-data")),
            store,
            replica,
            sets,
            journal: args.journal.or(file.journal).unwrap_or(Switch::On) == Switch::On,
            limits,
            queue_depth,
            batch_max,
            commit_spacing: Duration::from_micros(commit_spacing_us),
            user_rate: args.user_rate.or(file.user_rate).unwrap_or(hongbao_api::USER_REQUESTS_PER_S),
            log_format: args.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
            log: args.log.or(file.log),
            token_secret,
            file_api_key: file.api_key,
            file_admin_key: file.admin_key,
        })
    }
}

/// Generated keys, kept in `<data>/keys.toml` (mode 0600) so a restart keeps them.
#[derive(Debug, Deserialize, serde::Serialize)]
struct KeysFile {
    api_key: String,
    admin_key: String,
}

/// The service and admin keys: environment first, then the config file, then the data dir's
/// generated keys (made on first start). Returns the keys and, when generated or read from
/// the data dir, the file's path.
pub fn keys(settings: &Settings) -> Result<(String, String, Option<PathBuf>), String> {
    let env = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    let api = env("HONGBAO_API_KEY").or_else(|| settings.file_api_key.clone());
    let admin = env("HONGBAO_ADMIN_KEY").or_else(|| settings.file_admin_key.clone());
    if let (Some(api), Some(admin)) = (&api, &admin) {
        return Ok((api.clone(), admin.clone(), None));
    }
    let path = settings.data.join("keys.toml");
    let stored = load_or_make_keys(&path)?;
    Ok((api.unwrap_or(stored.api_key), admin.unwrap_or(stored.admin_key), Some(path)))
}

fn load_or_make_keys(path: &Path) -> Result<KeysFile, String> {
    if path.exists() {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        return toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()));
    }
    let hex = |prefix: &str| {
        let bytes: [u8; 32] = rand::random();
        let mut s = String::from(prefix);
        for b in bytes {
            s.push_str(&format!("{b:02x}"));
        }
        s
    };
    let keys = KeysFile { api_key: hex("hb_svc_"), admin_key: hex("hb_adm_") };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let text = toml::to_string(&keys).map_err(|e| e.to_string())?;
    write_private(path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(keys)
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}
