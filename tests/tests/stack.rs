//! The local stack runs Redis the way `docs/operations.md` ("Redis
//! durability and high availability") tells production to: AOF fsynced every
//! second, no eviction. Checked on the running Redis, and by restarting a
//! Redis started with the same settings: its sets are still there.

use std::process::{Command, Stdio};
use std::time::Duration;

use streampipe_tests::{free_port, redis_url, wait_for};

fn config(c: &mut redis::Connection, name: &str) -> String {
    let v: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(name).query(c).unwrap();
    v.get(1).cloned().unwrap_or_default()
}

#[test]
fn stack_redis_runs_with_aof_everysec_and_no_eviction() {
    let mut c = redis::Client::open(redis_url())
        .unwrap()
        .get_connection()
        .unwrap();
    assert_eq!(config(&mut c, "appendonly"), "yes", "scripts/stack.sh");
    assert_eq!(config(&mut c, "appendfsync"), "everysec");
    assert_eq!(config(&mut c, "maxmemory-policy"), "noeviction");
}

/// The stack's Redis settings survive a `kill -9` of Redis: what was
/// acknowledged is in the AOF (written before the reply; the fsync a second
/// later only matters when the host itself dies).
#[test]
fn aof_everysec_keeps_subscriptions_across_a_redis_kill() {
    let dir = std::env::temp_dir().join(streampipe_tests::unique("aof"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let start = || {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        let url = format!("redis://127.0.0.1:{port}");
        let conn = wait_for(Duration::from_secs(10), "redis up", || {
            let mut c = redis::Client::open(url.as_str())
                .ok()?
                .get_connection()
                .ok()?;
            // A Redis still loading its AOF answers LOADING.
            redis::cmd("PING").query::<String>(&mut c).ok()?;
            Some(c)
        });
        (child, conn)
    };
    let (mut redis, mut c) = start();
    for i in 0..1000 {
        let _: () = redis::cmd("SADD")
            .arg(format!("sp:t:{{m:m{i}}}:m2c"))
            .arg("ch")
            .query(&mut c)
            .unwrap();
    }
    redis.kill().unwrap(); // SIGKILL, right after the last reply
    redis.wait().unwrap();
    let (mut redis, mut c) = start();
    let n: usize = redis::cmd("DBSIZE").query(&mut c).unwrap();
    redis.kill().unwrap();
    redis.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(n, 1000, "sets lost across a kill -9 of an AOF Redis");
}
