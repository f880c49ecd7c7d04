//! The policy runs in `report.md`: one table of every case, the ratios
//! with their goals, the apply latency; and the figures a run must have.

use std::fmt::Write as _;

use super::policy::{CASES, PolicyCase, PolicyResult, case_name};
use super::report::{Stats, percentile, stats};

/// A goal for a ratio: how it reads and the test.
type Goal = (&'static str, fn(f64) -> bool);

/// A ratio of two cases' medians and the goal it is held to, if any.
struct RatioRow {
    num: &'static str,
    den: &'static str,
    /// TCP and UDP goals: (what, test).
    goals: Option<[Goal; 2]>,
}

const RATIOS: &[RatioRow] = &[
    RatioRow {
        num: "netd-1000",
        den: "netd-none",
        goals: Some([("≥ 0.97", |x| x >= 0.97), ("≥ 0.9", |x| x >= 0.9)]),
    },
    RatioRow {
        num: "netd-1000",
        den: "iptables-1000",
        goals: Some([("> 1", |x| x > 1.0), ("> 1", |x| x > 1.0)]),
    },
    RatioRow {
        num: "netd-10",
        den: "netd-none",
        goals: None,
    },
    RatioRow {
        num: "iptables-1000",
        den: "iptables-none",
        goals: None,
    },
    RatioRow {
        num: "netd-none",
        den: "iptables-none",
        goals: None,
    },
];

fn case<'a>(r: &'a PolicyResult, name: &str) -> Option<&'a PolicyCase> {
    r.cases.iter().find(|c| c.name == name)
}

fn figure(r: &PolicyResult, name: &str, workload: &str, metric: &str) -> Option<Stats> {
    stats(&case(r, name)?.values(workload, metric))
}

/// Three significant figures or so, as the other tables.
fn num(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 10.0 => format!("{v:.1}"),
        a if a >= 1.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

fn cell(st: Option<Stats>) -> String {
    match st {
        Some(s) if s.n > 1 => format!("{} ({}–{})", num(s.median), num(s.min), num(s.max)),
        Some(s) => num(s.median),
        None => "-".into(),
    }
}

/// The most cores found busy with other work before a run of `workload`:
/// ratios of cases measured against different load mean little.
fn other_load(c: &PolicyCase, workload: &str) -> String {
    c.samples
        .iter()
        .filter(|s| s.workload == workload)
        .map(|s| s.background_cores)
        .reduce(f64::max)
        .map_or("-".into(), |x| format!("{x:.2}"))
}

fn ratio(a: Option<Stats>, b: Option<Stats>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b.median != 0.0 => Some(a.median / b.median),
        _ => None,
    }
}

pub fn markdown(s: &mut String, r: &PolicyResult) {
    let _ = writeln!(s, "## Policy enforcement: netd and iptables + ipset\n");
    let _ = writeln!(
        s,
        "Ingress policy on the server's host, the same rules on both: none, 10 rules \
         (10 label sets) and 1,000 rules (100 label sets); the measured flow matches \
         one rule, the last. The label sets other than the client's belong to \
         endpoints that exist only in etcd. Before each case, a TCP probe to a port \
         no rule allows must be dropped and counted (refused when there is no policy).\n"
    );
    let _ = writeln!(
        s,
        "| case | testbed | in the kernel | probe to a denied port | TCP 1 stream Gbit/s (min–max) | CPU cores per Gbit/s | UDP 64 B kpps (min–max) | CPU ns per packet | other load (TCP / UDP) |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"
    );
    for c in &r.cases {
        let f = |w, m| stats(&c.values(w, m));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            c.name,
            c.testbed,
            if c.kernel.is_empty() { "-" } else { &c.kernel },
            if c.denied_probe.is_empty() {
                "-"
            } else {
                &c.denied_probe
            },
            cell(f("tcp-1", "gbps")),
            cell(f("tcp-1", "cpu_s_per_gbit")),
            cell(f("udp-64", "kpps")),
            cell(f("udp-64", "cpu_ns_per_packet")),
            other_load(c, "tcp-1"),
            other_load(c, "udp-64"),
        );
    }
    s.push('\n');
    let _ = writeln!(
        s,
        "| ratio of medians | TCP 1 stream | goal | met | UDP 64 B kpps | goal | met | CPU ns per packet, UDP 64 B |"
    );
    let _ = writeln!(s, "| --- | ---: | --- | --- | ---: | --- | --- | ---: |");
    for row in RATIOS {
        let q = |w, m| ratio(figure(r, row.num, w, m), figure(r, row.den, w, m));
        let (tcp, udp) = (q("tcp-1", "gbps"), q("udp-64", "kpps"));
        let judged = |v: Option<f64>, goal: Option<Goal>| match (v, goal) {
            (_, None) => ("-".to_string(), "-"),
            (None, Some((g, _))) => (g.to_string(), "not measured"),
            (Some(x), Some((g, ok))) => (g.to_string(), if ok(x) { "yes" } else { "no" }),
        };
        let (tg, tm) = judged(tcp, row.goals.map(|g| g[0]));
        let (ug, um) = judged(udp, row.goals.map(|g| g[1]));
        let show = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.3}×"));
        let _ = writeln!(
            s,
            "| {} / {} | {} | {tg} | {tm} | {} | {ug} | {um} | {} |",
            row.num,
            row.den,
            show(tcp),
            show(udp),
            show(q("udp-64", "cpu_ns_per_packet")),
        );
    }
    s.push('\n');
    if let Some(a) = &r.apply {
        let p = |v: &[f64], q| percentile(v, q).map_or("-".into(), |x| format!("{x:.1}"));
        let _ = writeln!(
            s,
            "Apply to enforced: {} endpoints in etcd, a {}-rule policy applied {} times \
             with one new rule each time; from `netd policy apply` returning until the \
             server host's POLICY map admits the new port: p50 {} ms, p99 {} ms, max {} ms \
             ({} not seen within 30 s); `netd policy apply` itself p50 {} ms, p99 {} ms.\n",
            a.endpoints,
            a.rules,
            a.applies,
            p(&a.enforced_ms, 50.0),
            p(&a.enforced_ms, 99.0),
            p(&a.enforced_ms, 100.0),
            a.lost,
            p(&a.cli_ms, 50.0),
            p(&a.cli_ms, 99.0),
        );
    }
    let errors: Vec<String> = r
        .errors
        .iter()
        .cloned()
        .chain(
            r.cases
                .iter()
                .flat_map(|c| c.errors.iter().map(move |e| format!("{}: {e}", c.name))),
        )
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(s, "Policy errors:\n");
        for e in errors {
            let _ = writeln!(s, "- {e}");
        }
        s.push('\n');
    }
}

/// Every policy figure missing from `r` (or zero where traffic must move).
pub fn missing(r: Option<&PolicyResult>) -> Vec<String> {
    let Some(r) = r else {
        return vec!["policy: not measured".into()];
    };
    let mut out = Vec::new();
    for system in ["netd", "iptables"] {
        for rs in CASES {
            let name = case_name(system, rs);
            let Some(c) = case(r, &name) else {
                out.push(format!("policy {name}: not measured"));
                continue;
            };
            for (w, m) in [
                ("tcp-1", "gbps"),
                ("udp-64", "kpps"),
                ("udp-64", "cpu_ns_per_packet"),
            ] {
                if !c.values(w, m).iter().any(|&v| v > 0.0) {
                    out.push(format!("policy {name}: {w} {m}"));
                }
            }
            if !c.errors.is_empty() {
                out.push(format!("policy {name}: {}", c.errors.join("; ")));
            }
        }
    }
    match &r.apply {
        None => out.push("policy: apply latency".into()),
        Some(a) if a.enforced_ms.is_empty() || a.lost > 0 => out.push(format!(
            "policy apply latency: {} of {} applies seen",
            a.enforced_ms.len(),
            a.applies
        )),
        Some(_) => {}
    }
    out
}
