//! The throwaway clusters themselves: settings, crash and restart, clean-up, and streaming
//! replication with a promotion. These need PostgreSQL installed and fail without it.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use hongbao_testkit::{PgCluster, DATABASE};

fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn start_gives_a_fresh_database_with_durable_settings() {
    let pg = PgCluster::start();
    assert_eq!(pg.url(), format!("postgres://postgres@127.0.0.1:{}/{DATABASE}", pg.port()));
    assert_eq!(pg.psql("SELECT current_database()"), DATABASE);
    assert_eq!(pg.psql("SHOW fsync"), "on");
    assert_eq!(pg.psql("SHOW synchronous_commit"), "on");
    assert_eq!(pg.psql("SHOW max_connections"), "200");
    assert_eq!(pg.psql("SHOW listen_addresses"), "127.0.0.1");
    let socket_dir = pg.psql("SHOW unix_socket_directories");
    assert!(socket_dir.starts_with(&pg.dir().display().to_string()), "{socket_dir}");
    assert_eq!(pg.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"), "0");

    let other = pg.create_database("another_one");
    assert!(other.ends_with("/another_one"), "{other}");
    assert_eq!(pg.psql_in("another_one", "SELECT 1 + 1"), "2");
    assert!(pg.try_psql("SELECT * FROM no_such_table").is_err());
}

#[test]
fn kill9_loses_nothing_committed_and_restart_recovers() {
    let mut pg = PgCluster::start();
    pg.psql("CREATE TABLE t (v int); INSERT INTO t SELECT generate_series(1, 1000)");
    pg.kill9();
    assert!(!pg.is_running());
    assert!(pg.try_psql("SELECT 1").is_err(), "the server is gone");
    pg.restart();
    assert_eq!(pg.psql("SELECT count(*) FROM t"), "1000");
    assert!(pg.log().contains("database system was interrupted"), "crash recovery ran:\n{}", pg.log());

    pg.stop();
    assert!(pg.try_psql("SELECT 1").is_err());
    pg.restart();
    assert_eq!(pg.psql("SELECT sum(v) FROM t"), "500500");
}

#[test]
fn drop_stops_the_server_and_removes_its_dir() {
    let pg = PgCluster::start();
    let dir = pg.dir().to_owned();
    let port = pg.port();
    assert!(dir.join("data").join("PG_VERSION").exists());
    drop(pg);
    assert!(!dir.exists(), "{} is left behind", dir.display());
    eventually("the port to close", || TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn standbys_replicate_and_a_promoted_standby_takes_writes() {
    let (mut primary, mut standbys) = PgCluster::start_primary_with_standbys(2);
    assert_eq!(primary.psql("SHOW synchronous_standby_names"), "ANY 1 (s1, s2)");
    assert_eq!(
        primary.psql("SELECT string_agg(application_name || ':' || sync_state, ',' ORDER BY application_name) FROM pg_stat_replication"),
        "s1:quorum,s2:quorum"
    );
    assert_eq!(standbys[0].psql("SELECT pg_is_in_recovery()"), "t");

    primary.psql("CREATE TABLE t (v text); INSERT INTO t VALUES ('hello')");
    for s in &standbys {
        eventually("the row on the standby", || s.try_psql("SELECT v FROM t").as_deref() == Ok("hello"));
        assert!(s.try_psql("INSERT INTO t VALUES ('no')").is_err(), "a standby refuses writes");
    }

    primary.kill9();
    let s1 = &mut standbys[0];
    s1.promote();
    assert_eq!(s1.psql("SELECT pg_is_in_recovery()"), "f");
    s1.psql("INSERT INTO t VALUES ('after failover')");
    assert_eq!(s1.psql("SELECT count(*) FROM t"), "2");
}
