//! A Docker engine on a test host: `dockerd` in the host's network
//! namespace and a private mount namespace in which `/run/docker/plugins`
//! is this engine's own directory (so it finds its own host's netd), with
//! its own data root, exec root (and so its own containerd), pid file and
//! API socket. No bridge, no iptables. Every container is removed and
//! every process it started is stopped on drop, on failure too.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use tempfile::TempDir;

use crate::{Daemon, Host, NsRef, image::busybox_tar, util::output_text, wait_for};

/// The image every test container runs.
pub const IMAGE: &str = "netd-busybox";
/// Debian's docker.io, not whatever else is on PATH.
pub const DOCKER: &str = "/usr/bin/docker";
const DOCKERD: &str = "/usr/sbin/dockerd";
const PLUGINS: &str = "/run/docker/plugins";

pub struct Dockerd {
    ns: NsRef,
    dir: TempDir,
    daemon: Option<Daemon>,
    /// Holds the private mount namespace, so that a restarted engine finds
    /// the sandbox mounts of the containers that kept running.
    mounts: Option<Daemon>,
    starts: usize,
}

impl Dockerd {
    /// Starts the engine on `host` and imports the image.
    pub fn start(host: &Host) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-docker-", host.ns().name()))
            .tempdir_in("/tmp")
            .expect("docker dir");
        for d in ["plugins", "data", "exec", "config"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("daemon.json"), "{}").unwrap();
        let mut engine = Dockerd {
            ns: host.ns().handle(),
            dir,
            daemon: None,
            mounts: None,
            starts: 0,
        };
        engine.hold_mounts();
        engine.spawn();
        let tar = busybox_tar(engine.dir.path());
        engine.run_ok(&["import", tar.to_str().unwrap(), IMAGE]);
        engine
    }

    /// Where netd must serve the plugin for this engine to find it.
    pub fn plugin_socket(&self) -> PathBuf {
        self.path("plugins").join("netd.sock")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn hold_mounts(&mut self) {
        let d = self.dir.path().display();
        let script = format!(
            "mkdir -p {PLUGINS} && mount --bind {d}/plugins {PLUGINS} && touch {d}/mounted \
             && exec sleep infinity"
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(script);
        let holder = Daemon::spawn(cmd, "mount namespace holder", &self.path("mounts.log"));
        let mounted = self.path("mounted");
        wait_for("private mount namespace", Duration::from_secs(10), || {
            mounted.exists()
        });
        self.mounts = Some(holder);
    }

    fn spawn(&mut self) {
        let holder = self.mounts.as_ref().expect("mount namespace").pid();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns.path().display()))
            .arg(format!("--mount=/proc/{holder}/ns/mnt"))
            .arg(DOCKERD)
            .args(self.dockerd_args());
        let log = self.path(&format!("dockerd.{}.log", self.starts));
        self.starts += 1;
        self.daemon = Some(Daemon::spawn(
            cmd,
            format!("dockerd in {}", self.ns.name()),
            &log,
        ));
        wait_for("dockerd answers", Duration::from_secs(30), || {
            self.run(&["version"]).status.success()
        });
    }

    fn dockerd_args(&self) -> Vec<String> {
        let d = self.dir.path().display();
        format!(
            "--config-file {d}/daemon.json --data-root {d}/data --exec-root {d}/exec \
             --pidfile {d}/docker.pid -H unix://{d}/docker.sock \
             --bridge=none --iptables=false --ip-masq=false --ip6tables=false \
             --userland-proxy=false --live-restore \
             --storage-driver overlay2 --exec-opt native.cgroupdriver=cgroupfs"
        )
        .split_whitespace()
        .map(str::to_string)
        .collect()
    }

    /// Stops the engine (containers keep running: live restore) and starts
    /// it again.
    pub fn restart(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.stop();
        }
        self.spawn();
    }

    /// `docker ARGS…` against this engine.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(DOCKER);
        cmd.arg("-H")
            .arg(format!("unix://{}", self.path("docker.sock").display()))
            .args(args)
            .env("DOCKER_CONFIG", self.path("config"));
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running docker")
    }

    /// Panics with docker's output on failure; returns stdout, trimmed.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "docker {args:?} failed ({}):\n{}",
            out.status,
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A container's address on `network`.
    pub fn ip(&self, name: &str, network: &str) -> Ipv4Addr {
        let format = format!("{{{{(index .NetworkSettings.Networks {network:?}).IPAddress}}}}");
        let ip = self.run_ok(&["inspect", "-f", &format, name]);
        ip.parse()
            .unwrap_or_else(|_| panic!("{name} has no address on {network}: {ip:?}"))
    }

    /// A container's main process id (its network namespace is that
    /// process's).
    pub fn pid(&self, name: &str) -> u32 {
        self.run_ok(&["inspect", "-f", "{{.State.Pid}}", name])
            .parse()
            .expect("pid")
    }

    /// Processes started for this engine (containerd, shims, containers'
    /// init) found by the engine's directory on their command line.
    fn leftover_pids(&self) -> Vec<i32> {
        let needle = self.dir.path().display().to_string();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                    .unwrap_or(false)
            })
            .collect()
    }
}

/// A container's network namespace under /run/netns for the length of a
/// measurement (`ip netns attach`), removed on drop.
pub struct ContainerNs {
    pub ns: NsRef,
}

impl ContainerNs {
    pub fn attach(engine: &Dockerd, container: &str) -> Self {
        let name = format!("{}-{container}", crate::unique_name());
        let pid = engine.pid(container).to_string();
        let out = Command::new("ip")
            .args(["netns", "attach", &name, &pid])
            .output()
            .expect("ip netns attach");
        assert!(
            out.status.success(),
            "ip netns attach: {}",
            output_text(&out)
        );
        ContainerNs {
            ns: NsRef::new(name),
        }
    }
}

impl Drop for ContainerNs {
    fn drop(&mut self) {
        // Only the name goes: the namespace is the container's.
        let path = self.ns.path();
        let _ = nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&path);
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if self.daemon.is_some() {
            let ids = self.run(&["ps", "-aq"]);
            let ids = String::from_utf8_lossy(&ids.stdout).to_string();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = self.run(&args);
            }
        }
        if let Some(mut daemon) = self.daemon.take() {
            daemon.stop();
        }
        if let Some(mut holder) = self.mounts.take() {
            holder.stop();
        }
        for pid in self.leftover_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Containers' files were mounted only in the engine's mount
        // namespace, gone with it: the directory removes as plain files.
    }
}

/// One plugin call as Docker makes it: `POST /METHOD` with a JSON body on
/// the plugin's unix socket. Returns the status code and the JSON answer.
pub fn plugin_call(socket: &std::path::Path, method: &str, body: &str) -> (u16, serde_json::Value) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!(
        "POST /{method} HTTP/1.0\r\nHost: plugin\r\nContent-Type: application/vnd.docker.plugins.v1+json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{method} answered non-JSON ({e}): {body:?}"));
    (status, value)
}
