//! Links the `ambient-cni` binary statically (glibc, not position-independent) when it can.
//!
//! Why: the runtime starts the plugin once per pod event, and for a small Rust binary most of that
//! cost is the dynamic loader: mapping libc, libm and libgcc_s, resolving symbols, and applying the
//! PIE relocations. Measured on a 2-core VM: a static C program 0.37 ms, a Rust hello-world
//! 0.72 ms dynamic, 0.52 ms static-pie, 0.44 ms static non-PIE. `bench/RESULTS.md` has the whole
//! plugin.
//!
//! How, without changing how anyone builds (`cargo build`, the tests, the Dockerfile): Cargo has
//! no per-package `-C target-feature=+crt-static`, and rustc asks for `-lgcc_s -lc ...` shared
//! libraries on the gnu target. So for the binaries only, we hand the linker a directory that it
//! searches first, holding the static archives under the names rustc asks for (libgcc_s.a is a
//! linker script that pulls libgcc_eh.a and libgcc.a), and add `-no-pie -static`. The code is
//! compiled position-independent as usual and is fine in a fixed-address executable.
//!
//! Only for a native x86_64/aarch64 linux-gnu build whose C compiler finds the static archives
//! (Debian: libc6-dev, which every Rust build there needs anyway). Otherwise, or with
//! `AMBIENT_CNI_DYNAMIC=1`, the binary is linked the default way and a warning says so.

use std::path::{Path, PathBuf};
use std::process::Command;

fn archive(cc: &str, name: &str) -> Option<PathBuf> {
    let out = Command::new(cc)
        .arg(format!("-print-file-name={name}"))
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    // An unknown file is echoed back as a bare name.
    (out.status.success() && p.is_absolute() && p.is_file()).then(|| p.canonicalize().unwrap_or(p))
}

fn link(dir: &Path, cc: &str) -> Result<(), String> {
    let need = |n: &str| archive(cc, n).ok_or_else(|| format!("{cc} does not find {n}"));
    let (gcc_eh, gcc, libc) = (need("libgcc_eh.a")?, need("libgcc.a")?, need("libc.a")?);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    // What rustc passes for std on linux-gnu: -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc.
    for lib in ["c", "m", "rt", "pthread", "dl", "util"] {
        let name = format!("lib{lib}.a");
        let src = need(&name)?;
        let dst = dir.join(&name);
        let _ = std::fs::remove_file(&dst);
        std::os::unix::fs::symlink(&src, &dst).map_err(|e| format!("{}: {e}", dst.display()))?;
    }
    let script = format!(
        "/* the unwinder and compiler runtime, statically (see build.rs) */\nGROUP ( {} {} {} )\n",
        gcc_eh.display(),
        gcc.display(),
        libc.display()
    );
    std::fs::write(dir.join("libgcc_s.a"), script).map_err(|e| e.to_string())?;
    println!("cargo:rustc-link-arg-bins=-L{}", dir.display());
    println!("cargo:rustc-link-arg-bins=-no-pie");
    println!("cargo:rustc-link-arg-bins=-static");
    Ok(())
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=AMBIENT_CNI_DYNAMIC");
    println!("cargo:rerun-if-env-changed=CC");
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    if !env("AMBIENT_CNI_DYNAMIC").is_empty() {
        return;
    }
    let target = env("TARGET");
    let native = target == env("HOST");
    let gnu = target.ends_with("-unknown-linux-gnu")
        && (target.starts_with("x86_64") || target.starts_with("aarch64"));
    let crt_static = env("CARGO_CFG_TARGET_FEATURE")
        .split(',')
        .any(|f| f == "crt-static");
    if !native || !gnu || crt_static {
        // Cross builds keep their toolchain's defaults; musl and crt-static are static already.
        return;
    }
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let dir = PathBuf::from(env("OUT_DIR")).join("static-libs");
    if let Err(e) = link(&dir, &cc) {
        println!("cargo:warning=ambient-cni is linked dynamically (slower start-up): {e}");
    }
}
