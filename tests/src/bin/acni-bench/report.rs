//! The bench's report: the machine it ran on and the table of figures, with the goals.

use std::fmt::Write as _;
use std::time::Duration;

use super::{ms, Opts, Pct, Results};

pub(super) fn loadavg() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `nproc`, CPU model, kernel, and the load average at the start and the end of the run.
pub(super) fn machine(load_at_start: &str) -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "nproc {cpus}, {model}, Linux {}; load average {load_at_start} at the start, {} at the end",
        kernel.trim(),
        loadavg()
    )
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

pub(super) fn table(r: &Results, opts: &Opts) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "| figure | value | goal | |");
    let _ = writeln!(t, "|---|---:|---|---|");
    let row = |t: &mut String, what: &str, value: String, goal: &str, v: &str| {
        let _ = writeln!(t, "| {what} | {value} | {goal} | {v} |");
    };
    let p = |x: Pct| format!("{} / {} ms", ms(x.p50), ms(x.p99));
    row(
        &mut t,
        "floor: exec of a static C binary that reads stdin, p50 / p99",
        p(r.floor),
        "",
        "",
    );
    row(
        &mut t,
        "ambient-cni start-up alone (CNI VERSION, no daemon call, first level), p50 / p99",
        p(r.version),
        "",
        "",
    );
    row(
        &mut t,
        "ambient-cni + one gRPC round trip, no kernel work (CNI STATUS at the first level), p50 / p99",
        p(r.status),
        "",
        "",
    );
    row(
        &mut t,
        "baseline: sh plugin with `ipset` + `ip route`, ADD p50 / p99",
        p(r.shell_add),
        "",
        "",
    );
    row(
        &mut t,
        "baseline: sh plugin, DEL p50 / p99",
        p(r.shell_del),
        "",
        "",
    );
    let quietest = r
        .levels
        .iter()
        .map(|l| l.floor.p50)
        .min()
        .unwrap_or_default();
    for l in &r.levels {
        // The floor of a level well above the quietest level's: other load ran meanwhile.
        let noisy = l.floor.p50.as_secs_f64() > 1.25 * quietest.as_secs_f64();
        row(
            &mut t,
            &format!(
                "ambient-cni ADD at {} pods, p50 / p99 (floor p50 in the same rounds: {} ms{})",
                l.pods,
                ms(l.floor.p50),
                if noisy { ", noisy" } else { "" }
            ),
            p(l.add),
            "",
            "",
        );
        row(
            &mut t,
            &format!("ambient-cni DEL at {} pods, p50 / p99", l.pods),
            p(l.del),
            "",
            "",
        );
    }
    let us = |v: Option<Duration>| v.map_or("n/a".to_string(), |v| format!("{} µs", v.as_micros()));
    let mut cpu = format!("STATUS {}", us(r.cpu_status));
    for l in &r.levels {
        let _ = write!(
            cpu,
            "; at {} pods ADD {}, DEL {}",
            l.pods,
            us(l.cpu_add),
            us(l.cpu_del)
        );
    }
    row(
        &mut t,
        "daemon CPU per call, p50 (on-CPU time of all its threads across one plugin call)",
        cpu,
        "",
        "",
    );
    let first = r.levels.first();
    let last = r.levels.last();
    if let (Some(f), Some(l)) = (first, last) {
        let add = f.add.p50.as_secs_f64();
        let x_floor = add / r.floor.p50.as_secs_f64().max(1e-9);
        row(
            &mut t,
            &format!("ADD p50 at {} pods ÷ floor p50", f.pods),
            format!("{x_floor:.2}×"),
            "≤ 1.5×",
            verdict(x_floor <= 1.5),
        );
        let x_shell = r.shell_add.p50.as_secs_f64() / add.max(1e-9);
        row(
            &mut t,
            &format!("baseline ADD p50 ÷ ADD p50 at {} pods", f.pods),
            format!("{x_shell:.2}×"),
            "≥ 3×",
            verdict(x_shell >= 3.0),
        );
        let x_scale = l.add.p50.as_secs_f64() / add.max(1e-9);
        row(
            &mut t,
            &format!("ADD p50 at {} pods ÷ at {} pods", l.pods, f.pods),
            format!("{x_scale:.2}×"),
            "≤ 1.1×",
            verdict(x_scale <= 1.1),
        );
    }
    if let Some(f) = first {
        row(
            &mut t,
            &format!(
                "dual-stack pod (IPv4 + IPv6) ADD at {} pods, p50 / p99",
                f.pods
            ),
            p(r.dual_add),
            "",
            "",
        );
        let x_dual = r.dual_add.p50.as_secs_f64() / r.dual_v4_add.p50.as_secs_f64().max(1e-9);
        row(
            &mut t,
            &format!(
                "dual-stack ADD p50 ÷ IPv4 ADD p50 at {} pods (same rounds)",
                f.pods
            ),
            format!("{x_dual:.2}×"),
            "≤ 1.3×",
            verdict(x_dual <= 1.3),
        );
        let fw = &r.firewall;
        row(
            &mut t,
            &format!(
                "ADD at {} pods on `--firewall nftables` / `iptables` ({} ADDs each, alternating blocks), p50",
                f.pods, fw.samples
            ),
            format!("{} / {} ms", ms(fw.nftables.p50), ms(fw.iptables.p50)),
            "",
            "",
        );
        let x_fw = super::firewall::ratio(fw);
        row(
            &mut t,
            &format!(
                "nft ADD p50 ÷ iptables ADD p50 at {} pods (same run)",
                f.pods
            ),
            format!("{x_fw:.2}×"),
            "≤ 1.1×",
            verdict(x_fw <= 1.1),
        );
    }
    for (callers, n, took, before, after) in &r.throughput {
        let rate = *n as f64 / took.as_secs_f64();
        let (goal, v) = if *callers == 4 {
            ("≥ 1,500/s", verdict(rate >= 1500.0))
        } else {
            ("", "")
        };
        row(
            &mut t,
            &format!(
                "ADDs/s with {callers} parallel caller{} ({n} pods, {before}→{after})",
                if *callers == 1 { "" } else { "s" }
            ),
            format!("{rate:.0}/s"),
            goal,
            v,
        );
    }
    match r.restore {
        Some((micros, repaired, errors)) => {
            let ms = micros as f64 / 1e3;
            let note = if errors > 0 {
                format!(", {errors} errors")
            } else {
                String::new()
            };
            row(
                &mut t,
                &format!("restore of {} pods after a flush of ipset, mangle chain and table 100, median of {} ({repaired} ops{note})", r.max_pods, r.restores),
                format!("{ms:.1} ms"),
                "≤ 100 ms",
                verdict(ms <= 100.0 && errors == 0),
            );
        }
        None => row(
            &mut t,
            &format!("restore of {} pods after a flush", r.max_pods),
            "not measured".into(),
            "≤ 100 ms",
            "MISS",
        ),
    }
    match r.nochange {
        Some(us) => row(
            &mut t,
            &format!(
                "no-change resync over {} pods (every {} ms)",
                r.max_pods, opts.resync_ms
            ),
            format!("{:.1} ms", us as f64 / 1e3),
            "",
            "",
        ),
        None => row(&mut t, "no-change resync", "not measured".into(), "", ""),
    }
    let mb = |k: u64| format!("{:.1} MB", k as f64 / 1024.0);
    row(&mut t, "daemon RSS idle", mb(r.rss_idle_kib), "", "");
    let full = r.rss_full_kib as f64 / 1024.0;
    row(
        &mut t,
        &format!(
            "daemon RSS at {} pods (peak over two resyncs, VmHWM)",
            r.max_pods
        ),
        mb(r.rss_full_kib),
        "≤ 10 MB",
        verdict(full <= 10.0),
    );
    t
}
