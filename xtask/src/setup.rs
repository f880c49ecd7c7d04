//! `cargo xtask setup`: install what building and testing netd needs.
//!
//! Idempotent: each step checks first and only acts when something is missing.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::util::{self, cargo_home, is_root, which};

#[derive(Args, Default)]
pub struct Options {
    /// Rebuild bpf-linker even if a working one is installed (e.g. after the
    /// nightly toolchain changed its LLVM).
    #[arg(long)]
    pub reinstall_bpf_linker: bool,
}

/// A Debian package and what the build or the tests need of it.
struct Requirement {
    package: &'static str,
    /// What is needed of it, for the report.
    need: &'static str,
    /// Ok when the need is met; Err says what is missing.
    check: fn() -> Result<(), String>,
}

/// Debian packages. Each is checked by using it the way netd's build or
/// tests do, so a package that leaves a piece out fails here, by name,
/// and not minutes later in a build script.
const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        package: "protobuf-compiler",
        need: "protoc (etcd-client's build script)",
        check: || runs("protoc", &["--version"]),
    },
    Requirement {
        package: "libprotobuf-dev",
        need: "google/protobuf/*.proto for protoc (etcd-client imports them)",
        check: protoc_finds_well_known_types,
    },
    Requirement {
        package: "etcd-server",
        need: "etcd (integration tests)",
        check: || runs("etcd", &["--version"]),
    },
    Requirement {
        package: "etcd-client",
        need: "etcdctl (integration tests)",
        check: || runs("etcdctl", &["version"]),
    },
    Requirement {
        package: "bpftool",
        need: "bpftool (tests read pinned maps)",
        check: || runs("bpftool", &["version"]),
    },
    Requirement {
        package: "iperf3",
        need: "iperf3 (TCP tests, bench)",
        check: || runs("iperf3", &["--version"]),
    },
    Requirement {
        package: "tshark",
        need: "tshark (captures in tests)",
        check: || runs("tshark", &["--version"]),
    },
    Requirement {
        package: "iproute2",
        need: "ip and tc (topologies)",
        check: || runs("ip", &["-V"]).and_then(|()| runs("tc", &["-V"])),
    },
    Requirement {
        package: "iputils-ping",
        need: "ping (tests)",
        check: || runs("ping", &["-V"]),
    },
    Requirement {
        package: "ethtool",
        need: "ethtool (offload settings in tests and bench)",
        check: || runs("ethtool", &["--version"]),
    },
    Requirement {
        package: "iptables",
        need: "iptables-restore and iptables-save (bench: the iptables policy peer)",
        check: || runs("iptables-restore", &["--version"]),
    },
    Requirement {
        package: "ipset",
        need: "ipset (bench: the iptables policy peer's selectors)",
        check: || runs("ipset", &["--version"]),
    },
    Requirement {
        package: "sockperf",
        need: "sockperf (bench latency)",
        check: || runs("sockperf", &["--version"]),
    },
    Requirement {
        package: "prometheus",
        need: "prometheus and promtool (metrics tests)",
        check: || {
            runs("prometheus", &["--version"]).and_then(|()| runs("promtool", &["--version"]))
        },
    },
    Requirement {
        package: "pkg-config",
        need: "pkg-config (nftnl-sys and mnl-sys find their libraries)",
        check: || runs("pkg-config", &["--version"]),
    },
    Requirement {
        package: "libnftnl-dev",
        need: "libnftnl for pkg-config (netd's masquerading rules)",
        check: || runs("pkg-config", &["--exists", "libnftnl"]),
    },
    Requirement {
        package: "libmnl-dev",
        need: "libmnl for pkg-config (netd's nftables netlink socket)",
        check: || runs("pkg-config", &["--exists", "libmnl"]),
    },
    Requirement {
        package: "nftables",
        need: "nft (egress tests read and delete netd's table)",
        check: || runs("nft", &["--version"]),
    },
    Requirement {
        package: "python3",
        need: "python3 (egress tests send hand-made spoofed packets)",
        check: || runs("python3", &["--version"]),
    },
    Requirement {
        package: "fonts-dejavu-core",
        need: "DejaVuSans.ttf (the bench chart)",
        check: || exists("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    },
    Requirement {
        package: "podman",
        need: "podman 4 with the CNI backend (podman tests)",
        check: || runs("podman", &["--version"]),
    },
    Requirement {
        package: "runc",
        need: "runc (podman's runtime in tests; crun refuses hybrid cgroups)",
        check: || runs("runc", &["--version"]),
    },
    Requirement {
        package: "containernetworking-plugins",
        need: "/usr/lib/cni/tuning (chained after netd-cni in podman tests)",
        check: || exists("/usr/lib/cni/tuning"),
    },
    Requirement {
        package: "docker.io",
        need: "dockerd and docker, Debian's (Docker plugin tests)",
        check: || {
            runs("/usr/sbin/dockerd", &["--version"])
                .and_then(|()| runs("/usr/bin/docker", &["--version"]))
        },
    },
    Requirement {
        package: "busybox-static",
        need: "a static /bin/busybox with ping and nc (the podman test image)",
        check: static_busybox,
    },
];

/// `/bin/busybox` has ping and nc and needs no dynamic loader, so it runs
/// alone in an image made of nothing else.
fn static_busybox() -> Result<(), String> {
    let path = "/bin/busybox";
    let bytes = fs::read(path).map_err(|e| format!("reading {path}: {e}"))?;
    if bytes.windows(15).any(|w| w == b"/lib64/ld-linux") {
        return Err(format!("{path} is dynamically linked"));
    }
    let out = Command::new(path)
        .arg("--list")
        .output()
        .map_err(|e| format!("{path} does not start: {e}"))?;
    let applets = String::from_utf8_lossy(&out.stdout);
    for applet in ["ping", "nc", "md5sum", "seq"] {
        if !applets.lines().any(|l| l == applet) {
            return Err(format!("{path} has no {applet}"));
        }
    }
    Ok(())
}

/// Answer tshark's debconf question ahead of time.
const TSHARK_PRESEED: &str = "wireshark-common wireshark-common/install-setuid boolean false\n";

const NIGHTLY: &str = "nightly";

pub fn run(opts: &Options) -> Result<()> {
    println!("==> setup");
    apt_packages()?;
    nightly_toolchain()?;
    bpf_linker(opts.reinstall_bpf_linker)?;
    bpffs()?;
    println!("==> setup done");
    Ok(())
}

fn ok(what: &str, detail: impl std::fmt::Display) {
    println!("  ok    {what}: {detail}");
}

fn doing(what: &str, detail: impl std::fmt::Display) {
    println!("  setup {what}: {detail}");
}

/// Ok when `program args` starts and exits 0.
fn runs(program: &str, args: &[&str]) -> Result<(), String> {
    let path = which(program).ok_or_else(|| format!("`{program}` is not on PATH"))?;
    match Command::new(&path).args(args).stdin(Stdio::null()).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("`{}` does not start: {e}", path.display())),
    }
}

fn exists(path: &str) -> Result<(), String> {
    if Path::new(path).exists() {
        Ok(())
    } else {
        Err(format!("{path} does not exist"))
    }
}

/// protoc compiles a file that imports a well-known type, as etcd-client's
/// protos do: this fails without libprotobuf-dev even when protoc runs.
fn protoc_finds_well_known_types() -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("netd-setup-protoc-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let proto = dir.join("check.proto");
    let text = "syntax = \"proto3\";\nimport \"google/protobuf/descriptor.proto\";\n\
                message Check { google.protobuf.FileDescriptorProto f = 1; }\n";
    let result = fs::write(&proto, text)
        .map_err(|e| format!("writing {}: {e}", proto.display()))
        .and_then(|()| {
            let include = format!("-I{}", dir.display());
            let out = format!("--descriptor_set_out={}", dir.join("out.pb").display());
            let file = proto.display().to_string();
            runs("protoc", &[&include, &out, &file])
        });
    let _ = fs::remove_dir_all(&dir);
    result
}

fn apt_packages() -> Result<()> {
    let mut missing = Vec::new();
    for req in REQUIREMENTS {
        match (req.check)() {
            Ok(()) => ok(req.package, req.need),
            Err(why) => {
                doing(req.package, format!("needed: {why}"));
                missing.push(req.package);
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "missing Debian packages: {list}\n\
             installing them needs root: run `cargo xtask setup` as root, \
             or `apt-get install {list}` yourself"
        );
    }
    if which("apt-get").is_none() {
        bail!(
            "missing packages: {list}\napt-get not found: install them with your package manager"
        );
    }
    doing("apt", format!("installing {list}"));

    if missing.contains(&"tshark") && which("debconf-set-selections").is_some() {
        println!("$ debconf-set-selections <<< '{}'", TSHARK_PRESEED.trim());
        let mut child = Command::new("debconf-set-selections")
            .stdin(Stdio::piped())
            .spawn()
            .context("failed to start debconf-set-selections")?;
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(TSHARK_PRESEED.as_bytes())?;
        let status = child.wait()?;
        if !status.success() {
            bail!("debconf-set-selections failed ({status})");
        }
    }

    util::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    )?;
    let guard = NoServiceStart::install()?;
    let installed = util::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()),
    );
    guard.remove();
    installed?;

    let mut still = Vec::new();
    for req in REQUIREMENTS {
        if let Err(why) = (req.check)() {
            println!("  FAIL  {}: {why}", req.package);
            still.push(req.package);
        }
    }
    if !still.is_empty() {
        bail!(
            "installed, yet still not usable as the build and tests need: {}",
            still.join(" ")
        );
    }
    Ok(())
}

/// A `policy-rc.d` that forbids package scripts to start services, for
/// the length of an install: packages such as prometheus would otherwise
/// start their daemon in the machine's own namespace.
struct NoServiceStart {
    created: bool,
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

impl NoServiceStart {
    fn install() -> Result<Self> {
        if Path::new(POLICY_RC_D).exists() {
            // The machine already has a policy; leave it as it is.
            return Ok(NoServiceStart { created: false });
        }
        fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# No service starts during netd's setup.\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(POLICY_RC_D, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(NoServiceStart { created: true })
    }

    fn remove(self) {
        if self.created {
            let _ = fs::remove_file(POLICY_RC_D);
        }
    }
}

fn nightly_toolchain() -> Result<()> {
    if which("rustup").is_none() {
        bail!(
            "rustup not found on PATH: it is needed for the nightly toolchain (rust-src) that builds the eBPF crate"
        );
    }
    let toolchains = util::output(Command::new("rustup").args(["toolchain", "list"]))?;
    let have_nightly = toolchains.lines().any(|l| {
        l.split_whitespace()
            .next()
            .is_some_and(|t| t == NIGHTLY || t.starts_with("nightly-"))
    });
    if have_nightly {
        ok("nightly toolchain", "installed");
    } else {
        doing("nightly toolchain", "installing");
        util::run(
            Command::new("rustup")
                .args(["toolchain", "install", NIGHTLY, "--profile", "minimal"])
                .args(["--component", "rust-src"])
                .stdin(Stdio::null()),
        )?;
    }

    let components = util::output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    if components.lines().any(|l| l.trim() == "rust-src") {
        ok("nightly rust-src", "installed");
    } else {
        doing("nightly rust-src", "installing");
        util::run(
            Command::new("rustup")
                .args(["component", "add", "rust-src", "--toolchain", NIGHTLY])
                .stdin(Stdio::null()),
        )?;
    }
    Ok(())
}

/// bpf-linker must be built against the same LLVM as the nightly rustc that
/// compiles the eBPF crate: we link it to nightly's own libLLVM.
fn bpf_linker(force: bool) -> Result<()> {
    if let Some(path) = which("bpf-linker").filter(|_| !force) {
        // A bpf-linker whose libLLVM is gone (nightly updated) fails here.
        match Command::new(&path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {
                let version = String::from_utf8_lossy(&out.stdout);
                ok(
                    "bpf-linker",
                    format!("{} ({})", version.trim(), path.display()),
                );
                return Ok(());
            }
            Ok(out) => doing(
                "bpf-linker",
                format!(
                    "{} does not run ({}), rebuilding: {}",
                    path.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ),
            Err(e) => doing(
                "bpf-linker",
                format!("{} does not run ({e}), rebuilding", path.display()),
            ),
        }
    }

    let sysroot = util::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let libllvm = find_libllvm(&libdir)?;
    let version = util::output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = llvm_major(&version)?;
    doing(
        "bpf-linker",
        format!("building against {} (LLVM {major})", libllvm.display()),
    );

    // bpf-linker records this folder as its RUNPATH, so it must outlive the
    // build: keep it in CARGO_HOME, not in target/.
    let prefix = cargo_home().join("netd-llvm");
    let prefix_lib = prefix.join("lib");
    if prefix_lib.exists() {
        fs::remove_dir_all(&prefix_lib)
            .with_context(|| format!("removing {}", prefix_lib.display()))?;
    }
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let file_name = libllvm.file_name().expect("a file");
    for link in [Path::new("libLLVM.so"), Path::new(file_name)] {
        let link = prefix_lib.join(link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("symlinking {}", link.display()))?;
        println!("  link  {} -> {}", link.display(), libllvm.display());
    }

    util::run(
        util::cargo()
            .args(["install", "bpf-linker", "--force", "--no-default-features"])
            .args(["--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix)
            .stdin(Stdio::null()),
    )?;
    let path = which("bpf-linker").context("bpf-linker installed but not found on PATH")?;
    util::run(Command::new(path).arg("--version"))?;
    Ok(())
}

/// The real shared library in the nightly sysroot, e.g.
/// `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn find_libllvm(libdir: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(libdir).with_context(|| format!("reading {}", libdir.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM.so.") && name.contains("-rust-") {
            found.push(entry.path());
        }
    }
    found.sort();
    match found.pop() {
        Some(path) => Ok(path),
        None => bail!(
            "no libLLVM.so.*-rust-* in {}: the nightly toolchain should ship it",
            libdir.display()
        ),
    }
}

/// The LLVM major version from `rustc -vV` (`LLVM version: 22.1.4`).
fn llvm_major(version: &str) -> Result<u32> {
    let line = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .context("`rustc +nightly -vV` printed no `LLVM version:` line")?;
    let major = line.trim().split('.').next().unwrap_or_default();
    major
        .parse()
        .with_context(|| format!("cannot read an LLVM major version from `{}`", line.trim()))
}

fn bpffs() -> Result<()> {
    const MOUNTPOINT: &str = "/sys/fs/bpf";
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let mut fields = l.split_whitespace();
        let _source = fields.next();
        fields.next() == Some(MOUNTPOINT) && fields.next() == Some("bpf")
    });
    if mounted {
        ok("bpffs", format!("mounted at {MOUNTPOINT}"));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "bpffs is not mounted at {MOUNTPOINT}, and mounting it needs root: `mount -t bpf bpf {MOUNTPOINT}`"
        );
    }
    doing("bpffs", format!("mounting at {MOUNTPOINT}"));
    fs::create_dir_all(MOUNTPOINT).with_context(|| format!("creating {MOUNTPOINT}"))?;
    util::run(Command::new("mount").args(["-t", "bpf", "bpf", MOUNTPOINT]))
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn reads_llvm_major() {
        let v = "rustc 1.97.0-nightly\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(v).unwrap(), 22);
        assert!(llvm_major("rustc 1.0\n").is_err());
    }
}
