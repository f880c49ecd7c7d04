//! A container image with no registry: a directory holding Debian's
//! `busybox-static` and its applets, as a tar for `docker import`.

use std::{os::unix::fs::symlink, path::Path, process::Command};

use crate::util::output_text;

const APPLETS: &[&str] = &[
    "sh", "ping", "nc", "sleep", "ip", "cat", "seq", "md5sum", "echo", "wc", "dd", "true",
];

/// Writes the root tree under `dir/image` and returns `dir/image.tar`.
pub fn busybox_tar(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("image");
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for d in ["tmp", "proc", "sys", "dev", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .expect("copy /bin/busybox (install busybox-static)");
    for applet in APPLETS {
        symlink("busybox", bin.join(applet)).unwrap();
    }
    let tar = dir.join("image.tar");
    let out = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .output()
        .expect("tar");
    assert!(out.status.success(), "tar: {}", output_text(&out));
    tar
}
