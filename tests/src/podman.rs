//! podman 4 (CNI backend) on a test host: its own storage, run root, temp
//! and network config directories, a busybox image made with
//! `podman import`, and every container removed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;
use tempfile::TempDir;

use crate::{Host, NsRef, util::output_text};

/// The image every test container runs.
pub const IMAGE: &str = "localhost/netd-busybox";

/// One host's podman. The network config directory holds `conflist`.
pub struct Podman {
    ns: NsRef,
    dir: TempDir,
}

impl Podman {
    /// Sets podman up on `host` with `conflist` (its `name` is the network
    /// name) and the plugins in `plugin_dirs`, then imports the image.
    pub fn new(host: &Host, conflist: &Value, plugin_dirs: &[&Path]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{}-podman-", host.ns().name()))
            .tempdir()
            .expect("podman dir");
        let podman = Podman {
            ns: host.ns().handle(),
            dir,
        };
        let net_d = podman.path("net.d");
        std::fs::create_dir_all(&net_d).unwrap();
        let name = conflist["name"].as_str().expect("conflist name");
        std::fs::write(net_d.join(format!("{name}.conflist")), conflist.to_string()).unwrap();
        let dirs: Vec<String> = plugin_dirs
            .iter()
            .map(|d| format!("{:?}", d.display().to_string()))
            .collect();
        // Raising RLIMIT_NOFILE is not permitted on every machine, and crun
        // refuses hybrid cgroup layouts: no ulimits, runc, cgroupfs.
        let conf = format!(
            "[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = \"cgroupfs\"\n\
             events_logger = \"file\"\nruntime = \"runc\"\n\n[network]\nnetwork_backend = \"cni\"\n\
             cni_plugin_dirs = [{}]\nnetwork_config_dir = {:?}\n",
            dirs.join(", "),
            net_d.display().to_string()
        );
        std::fs::write(podman.path("containers.conf"), conf).unwrap();
        podman.import_image();
        podman
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn import_image(&self) {
        let tar = crate::image::busybox_tar(self.dir.path());
        self.run_ok(&["import", tar.to_str().unwrap(), IMAGE]);
    }

    /// `podman ARGS…` in the host's network namespace (entered with
    /// nsenter, which keeps the real /sys, cgroups and bpffs).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns.path().display()))
            .arg("podman")
            .arg("--root")
            .arg(self.path("root"))
            .arg("--runroot")
            .arg(self.path("runroot"))
            .arg("--tmpdir")
            .arg(self.path("tmp"))
            .args(["--storage-driver", "vfs", "--runtime", "runc"])
            .args(["--cgroup-manager", "cgroupfs"])
            .args(args)
            .env("CONTAINERS_CONF", self.path("containers.conf"));
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running podman")
    }

    /// Panics with podman's output on failure; returns stdout, trimmed.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed ({}):\n{}",
            out.status,
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `podman inspect` of a container, as JSON.
    pub fn inspect(&self, name: &str) -> Value {
        let v: Value =
            serde_json::from_str(&self.run_ok(&["inspect", name])).expect("inspect JSON");
        v[0].clone()
    }

    /// A container's address on `network`.
    pub fn ip(&self, name: &str, network: &str) -> std::net::Ipv4Addr {
        let v = self.inspect(name);
        let ip = v["NetworkSettings"]["Networks"][network]["IPAddress"]
            .as_str()
            .unwrap_or_else(|| panic!("{name} has no address on {network}: {v}"));
        ip.parse().expect("IPv4 address")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers first (their CNI DEL and namespaces); the storage is
        // in the temporary directory, removed after this.
        let _ = self.command(&["rm", "-af", "-t", "0"]).output();
        let _ = self.command(&["rmi", "-af"]).output();
    }
}
