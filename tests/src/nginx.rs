//! A real caching proxy for the snapshot tests and benchmark: Debian's
//! nginx (`nginx-light`, installed by `scripts/lib.sh`) run as a child
//! process on a free loopback port with `proxy_cache` in front of a
//! publisher, as a CDN would be. Its configuration and cache live in a
//! temporary directory; both go when the value is dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, unique, wait_for};

/// An nginx caching proxy.
pub struct Nginx {
    child: Child,
    dir: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// The nginx binary (Debian's path, or `nginx` on the PATH).
fn nginx_bin() -> PathBuf {
    let debian = PathBuf::from("/usr/sbin/nginx");
    if debian.exists() {
        debian
    } else {
        PathBuf::from("nginx")
    }
}

impl Nginx {
    /// Starts nginx caching everything `upstream` lets it cache: the cache
    /// key is the request URI, concurrent misses of one key make one
    /// upstream request (`proxy_cache_lock`), stale entries are served while
    /// one request revalidates (`stale-while-revalidate` in the upstream's
    /// `Cache-Control` is honoured), and every answer says
    /// `X-Cache-Status` (`MISS`, `HIT`, `STALE`, `UPDATING`, `REVALIDATED`,
    /// `BYPASS`, `EXPIRED`).
    pub fn start_cache(upstream: SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(unique("sp-nginx"));
        std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
        // Worker processes run as nobody when the master is root: let them
        // write their cache and temp files here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let port = free_port();
        let d = dir.display();
        let conf = format!(
            r#"worker_processes 1;
error_log {d}/logs/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log {d}/logs/access.log;
    keepalive_requests 1000000;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy_temp;
    fastcgi_temp_path {d}/fastcgi_temp;
    uwsgi_temp_path {d}/uwsgi_temp;
    scgi_temp_path {d}/scgi_temp;
    proxy_cache_path {d}/cache levels=1:2 keys_zone=snapshots:1m max_size=64m inactive=10m use_temp_path=off;
    upstream publisher {{
        server {upstream};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://publisher;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_cache snapshots;
            proxy_cache_key $request_uri;
            proxy_cache_lock on;
            proxy_cache_use_stale updating error timeout;
            proxy_cache_background_update on;
            proxy_cache_revalidate on;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
    }}
}}
"#
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("nginx.conf");
        let child = Command::new(nginx_bin())
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .arg("-g")
            .arg("daemon off;")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nginx (apt-get install nginx-light)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let me = Nginx { child, dir, addr };
        wait_for(Duration::from_secs(10), "nginx listening", || {
            std::net::TcpStream::connect(me.addr).ok().map(|_| ())
        });
        me
    }

    /// nginx's error log (for failure messages).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM, not KILL: the master then stops its worker (a killed master
        // would leave the worker holding the port).
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
