//! Records the git commit and the candle version the binary was built from,
//! for the JSON of `cli compare` / `cli bench` (absent when unknown).

use std::path::Path;
use std::process::Command;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = root.join(".git");
    println!("cargo:rerun-if-changed={}", git.join("HEAD").display());
    if let Ok(head) = std::fs::read_to_string(git.join("HEAD"))
        && let Some(r) = head.trim().strip_prefix("ref: ")
    {
        println!("cargo:rerun-if-changed={}", git.join(r).display());
    }
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(&root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok());
    if let Some(c) = commit {
        println!("cargo:rustc-env=VPOD_GIT_COMMIT={}", c.trim());
    }
    let lock = root.join("Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    // `name = "candle-core"` is followed by its `version = "..."` line.
    if let Ok(text) = std::fs::read_to_string(&lock) {
        let mut lines = text.lines();
        while let Some(l) = lines.next() {
            if l == "name = \"candle-core\""
                && let Some(v) = lines.next().and_then(|v| v.strip_prefix("version = \""))
            {
                println!("cargo:rustc-env=VPOD_CANDLE_VERSION={}", v.trim_end_matches('"'));
                break;
            }
        }
    }
}
