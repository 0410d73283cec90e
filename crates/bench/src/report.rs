//! The results: what is kept per measured target, the JSON document and the printed tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::load::Stats;
use crate::system::{FileLimit, Machine, Memory};

/// Percentiles of a histogram of microseconds, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Pcts {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Pcts {
    /// `None` when the histogram is empty.
    pub fn of(histogram: &Histogram<u64>) -> Option<Self> {
        if histogram.is_empty() {
            return None;
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Some(Self {
            count: histogram.len(),
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
            mean: histogram.mean() / 1000.0,
        })
    }
}

/// One target (straight to the fake, through the bare proxy, or through the gateway) over all
/// rounds of a measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// `direct`, `bare-proxy` or `gateway`.
    pub target: String,
    /// Phases merged.
    pub phases: u32,
    /// Measured wall time, all phases.
    pub seconds: f64,
    /// Answers with the expected status.
    pub requests: u64,
    /// Transport errors, time-outs, unexpected statuses.
    pub errors: u64,
    /// Every status seen.
    pub statuses: BTreeMap<String, u64>,
    /// `requests / seconds`.
    pub requests_per_second: f64,
    /// Latency to the end of the answer (open loop: from the intended send time).
    pub latency_ms: Option<Pcts>,
    /// Time to the first body bytes (streams).
    pub ttfb_ms: Option<Pcts>,
    /// Gaps between body chunks as they arrived (slow streams).
    pub chunk_gap_ms: Option<Pcts>,
    /// `x-meta-chat-overhead-ms` of the gateway's answers (`None`: no answer carried it).
    pub overhead_header_ms: Option<Pcts>,
    /// `meta_chat_overhead_seconds` sum / count over the phases (all labels), if exported.
    pub overhead_metric_mean_ms: Option<f64>,
    /// Open loop: how late requests left after their intended send time.
    pub send_lag_ms: Option<Pcts>,
    /// Gateway CPU time (user + system) per answered request.
    pub gateway_cpu_ms_per_request: Option<f64>,
    /// The bare proxy's CPU time (user + system) per answered request (its own phases).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bare_cpu_ms_per_request: Option<f64>,
    /// CPU time of the fake upstream behind, per answered request.
    pub upstream_cpu_ms_per_request: Option<f64>,
    /// CPU time of this load generator per answered request.
    pub bench_cpu_ms_per_request: Option<f64>,
    /// The gateway's memory after the last phase.
    pub gateway_memory: Option<Memory>,
    /// Answers with `x-meta-chat-cache: hit`.
    pub cache_hits: u64,
    /// Connections opened during the phases beyond the pre-opened ones.
    pub reconnects: u64,
    /// The first distinct error messages.
    pub error_samples: Vec<String>,
}

/// CPU ticks and metric deltas accumulated over a target's phases.
#[derive(Debug, Clone, Default)]
pub struct Costs {
    /// Gateway ticks during gateway phases.
    pub gateway_ticks: u64,
    /// Bare-proxy ticks during bare-proxy phases (`None`: no such phase).
    pub bare_ticks: Option<u64>,
    /// Upstream fake ticks.
    pub upstream_ticks: u64,
    /// Own ticks.
    pub bench_ticks: u64,
    /// Sum and count deltas of `meta_chat_overhead_seconds`.
    pub metric: Option<(f64, f64)>,
    /// The gateway's memory after the last phase.
    pub memory: Option<Memory>,
}

impl Summary {
    /// Builds the summary of one target.
    pub fn new(
        target: &str,
        phases: u32,
        stats: &Stats,
        costs: &Costs,
        gateway: bool,
        ticks_per_second: u64,
    ) -> Self {
        let seconds = stats.elapsed.as_secs_f64();
        let per_request = |ticks: u64| {
            (stats.completed > 0)
                .then(|| ticks as f64 * 1000.0 / ticks_per_second as f64 / stats.completed as f64)
        };
        Self {
            target: target.to_owned(),
            phases,
            seconds,
            requests: stats.completed,
            errors: stats.errors,
            statuses: stats
                .statuses
                .iter()
                .map(|(status, n)| (status.to_string(), *n))
                .collect(),
            requests_per_second: if seconds > 0.0 {
                stats.completed as f64 / seconds
            } else {
                0.0
            },
            latency_ms: Pcts::of(&stats.latency),
            ttfb_ms: Pcts::of(&stats.ttfb),
            chunk_gap_ms: Pcts::of(&stats.gaps),
            overhead_header_ms: Pcts::of(&stats.overhead),
            overhead_metric_mean_ms: costs
                .metric
                .filter(|(_, count)| *count > 0.0)
                .map(|(sum, count)| sum / count * 1000.0),
            send_lag_ms: Pcts::of(&stats.send_lag),
            gateway_cpu_ms_per_request: if gateway {
                per_request(costs.gateway_ticks)
            } else {
                None
            },
            bare_cpu_ms_per_request: costs.bare_ticks.and_then(per_request),
            upstream_cpu_ms_per_request: per_request(costs.upstream_ticks),
            bench_cpu_ms_per_request: per_request(costs.bench_ticks),
            gateway_memory: costs.memory,
            cache_hits: stats.cache_hits,
            reconnects: stats.connects,
            error_samples: stats.error_samples.clone(),
        }
    }
}

/// A measurement straight to the fake and through the gateway (or the gateway alone), and
/// through the bare proxy where it is measured too.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    /// What was sent.
    pub name: String,
    /// How it was driven (`open loop 500/s`, `closed loop, 32 connections`).
    pub load: String,
    /// Straight to the fake upstream, when there is an equivalent.
    pub direct: Option<Summary>,
    /// Through the bare proxy (`bare-proxy`, the floor of the gateway's HTTP stack), when
    /// measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bare: Option<Summary>,
    /// Through the gateway.
    pub gateway: Summary,
}

impl Pair {
    /// The targets measured: direct, bare proxy, gateway.
    fn summaries(&self) -> impl Iterator<Item = &Summary> {
        self.direct
            .iter()
            .chain(&self.bare)
            .chain(std::iter::once(&self.gateway))
    }
}

/// The many-concurrent-streams measurement.
#[derive(Debug, Clone, Serialize)]
pub struct StreamsResult {
    /// The process the streams went through: `gateway`, or `bare proxy` (the floor of the
    /// HTTP stack, measured the same way afterwards).
    pub target: String,
    /// How the clients connected, e.g. "HTTP/1.1, a connection per stream".
    pub clients: String,
    /// Streams asked for.
    pub requested: usize,
    /// Connections established.
    pub connected: u64,
    /// Streams that received their first chunk.
    pub first_chunk: u64,
    /// The most streams open at the same time.
    pub open_peak: u64,
    /// Whether every stream had its first chunk before the wait gave up.
    pub all_first: bool,
    /// Seconds from the first connection until every stream had its first chunk.
    pub all_first_after_seconds: f64,
    /// Streams read to their end with status 200.
    pub completed: u64,
    /// Failures.
    pub errors: u64,
    /// Time to the first chunk.
    pub ttfb_ms: Option<Pcts>,
    /// Whole stream.
    pub stream_ms: Option<Pcts>,
    /// The target's memory before the streams were opened.
    pub gateway_before: Option<Memory>,
    /// The target's memory with every stream open.
    pub gateway_at_peak: Option<Memory>,
    /// Files the target had open before, with every stream open, and after all ended.
    pub gateway_open_files: [Option<u64>; 3],
    /// `(VmRSS at peak - VmRSS before) / open streams`, kB.
    pub rss_kb_per_stream: Option<f64>,
    /// The target's CPU time per stream.
    pub gateway_cpu_ms_per_stream: Option<f64>,
    /// Statuses seen.
    pub statuses: BTreeMap<String, u64>,
    /// The first distinct error messages.
    pub error_samples: Vec<String>,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// The machine.
    pub machine: Machine,
    /// Unix time the run started.
    pub started_unix: u64,
    /// The options in force.
    pub settings: serde_json::Value,
    /// The open-files limit.
    pub file_limit: Option<FileLimit>,
    /// Open loop at fixed rates.
    pub open_loop: Vec<Pair>,
    /// Closed loop, max throughput.
    pub throughput: Vec<Pair>,
    /// The scenarios.
    pub scenarios: Vec<Pair>,
    /// Many concurrent streams.
    pub streams: Option<StreamsResult>,
    /// The same streams through the bare proxy, afterwards.
    pub bare_streams: Option<StreamsResult>,
    /// The gateway's memory at the end.
    pub gateway_memory_end: Option<Memory>,
    /// Scenarios that could not run, and other things worth knowing.
    pub problems: Vec<String>,
}

fn ms(value: f64) -> String {
    if value < 1.0 {
        format!("{value:.3}")
    } else if value < 10.0 {
        format!("{value:.2}")
    } else if value < 100.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.0}")
    }
}

fn signed_ms(value: f64) -> String {
    if value < 0.0 {
        format!("−{}", ms(-value))
    } else {
        format!("+{}", ms(value))
    }
}

fn count(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn rate(value: f64) -> String {
    count(value.round() as u64)
}

fn p50_p99(pcts: Option<Pcts>) -> String {
    pcts.map_or_else(
        || "n/a".into(),
        |p| format!("{} / {}", ms(p.p50), ms(p.p99)),
    )
}

fn cpu(value: Option<f64>) -> String {
    value.map_or_else(|| "–".into(), |v| format!("{v:.3}"))
}

fn overhead(summary: &Summary) -> String {
    p50_p99(summary.overhead_header_ms)
}

fn statuses(summary: &Summary) -> String {
    summary
        .statuses
        .iter()
        .map(|(status, n)| format!("{status}×{}", count(*n)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn kb(value: u64) -> String {
    if value >= 10 * 1024 {
        format!("{:.1} MiB", value as f64 / 1024.0)
    } else {
        format!("{value} kB")
    }
}

fn memory(memory: Option<Memory>) -> String {
    memory.map_or_else(
        || "–".into(),
        |m| format!("{} / {}", kb(m.rss_kb), kb(m.hwm_kb)),
    )
}

impl Results {
    /// The readable report (markdown tables).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(out, "## meta-chat load benchmark");
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "commit {}{}, {} CPUs ({}), kernel {}, {:.1} GiB RAM; {}",
            m.git_commit.as_deref().unwrap_or("unknown"),
            if m.git_dirty == Some(true) {
                " (uncommitted changes)"
            } else {
                ""
            },
            m.nproc,
            m.cpu_model,
            m.kernel,
            m.mem_total_kb as f64 / 1024.0 / 1024.0,
            self.settings
                .get("summary")
                .and_then(|s| s.as_str())
                .unwrap_or("")
        );
        let _ = writeln!(
            out,
            "Latencies in ms. CPU = gateway user+system time per answered request (ms); \
             bare CPU = the same for bare-proxy, a plain axum + hyper-client pass-through (the floor \
             of the gateway's HTTP stack). overhead = x-meta-chat-overhead-ms p50 / p99 (n/a: \
             header absent)."
        );

        if !self.open_loop.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "### Open loop at fixed rates: non-stream chat, latency from the intended send time"
            );
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "| request | rate | target | requests | errors | p50 | p90 | p99 | max | CPU | overhead | send lag p99 |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|");
            for pair in &self.open_loop {
                let rows = pair.direct.iter().chain(std::iter::once(&pair.gateway));
                for s in rows {
                    let l = s.latency_ms;
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        pair.name,
                        pair.load,
                        s.target,
                        count(s.requests),
                        count(s.errors),
                        l.map_or("–".into(), |l| ms(l.p50)),
                        l.map_or("–".into(), |l| ms(l.p90)),
                        l.map_or("–".into(), |l| ms(l.p99)),
                        l.map_or("–".into(), |l| ms(l.max)),
                        cpu(s.gateway_cpu_ms_per_request),
                        if s.target == "gateway" {
                            overhead(s)
                        } else {
                            "–".into()
                        },
                        s.send_lag_ms.map_or("–".into(), |p| ms(p.p99)),
                    );
                }
                if let (Some(d), Some(g)) = (
                    pair.direct.as_ref().and_then(|d| d.latency_ms),
                    pair.gateway.latency_ms,
                ) {
                    let _ = writeln!(
                        out,
                        "| {} | {} | gateway − direct | | | {} | {} | {} | {} | | | |",
                        pair.name,
                        pair.load,
                        signed_ms(g.p50 - d.p50),
                        signed_ms(g.p90 - d.p90),
                        signed_ms(g.p99 - d.p99),
                        signed_ms(g.max - d.max),
                    );
                }
            }
        }

        if !self.throughput.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "### Max throughput, closed loop");
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "| request | load | direct req/s | bare req/s | bare/direct | gateway req/s | gateway/direct | direct p50 / p99 | gateway p50 / p99 | TTFB direct p50 / p99 | TTFB gateway p50 / p99 | bare CPU | CPU | overhead | errors d / b / g |"
            );
            let _ = writeln!(
                out,
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for pair in &self.throughput {
                let g = &pair.gateway;
                let d = pair.direct.as_ref();
                let b = pair.bare.as_ref();
                let stream = g.ttfb_ms.is_some();
                let to_direct = |s: &Summary| {
                    d.filter(|d| d.requests_per_second > 0.0)
                        .map_or("–".into(), |d| {
                            format!("{:.2}", s.requests_per_second / d.requests_per_second)
                        })
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} |",
                    pair.name,
                    pair.load,
                    d.map_or("–".into(), |d| rate(d.requests_per_second)),
                    b.map_or("–".into(), |b| rate(b.requests_per_second)),
                    b.map_or("–".into(), to_direct),
                    rate(g.requests_per_second),
                    to_direct(g),
                    d.map_or("–".into(), |d| p50_p99(d.latency_ms)),
                    p50_p99(g.latency_ms),
                    if stream {
                        d.map_or("–".into(), |d| p50_p99(d.ttfb_ms))
                    } else {
                        "–".into()
                    },
                    if stream {
                        p50_p99(g.ttfb_ms)
                    } else {
                        "–".into()
                    },
                    cpu(b.and_then(|b| b.bare_cpu_ms_per_request)),
                    cpu(g.gateway_cpu_ms_per_request),
                    overhead(g),
                    d.map_or("–".into(), |d| count(d.errors)),
                    b.map_or("–".into(), |b| count(b.errors)),
                    count(g.errors),
                );
            }
        }

        let scenario_rows: Vec<&Pair> = self
            .scenarios
            .iter()
            .filter(|p| p.gateway.chunk_gap_ms.is_none())
            .collect();
        if !scenario_rows.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "### Scenarios through the gateway, closed loop");
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "| scenario | load | req/s | p50 | p99 | CPU | errors | outcomes | direct req/s | direct p50 | direct p99 | overhead | VmRSS / VmHWM |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
            for pair in scenario_rows {
                let g = &pair.gateway;
                let d = pair.direct.as_ref();
                let mut outcomes = statuses(g);
                if g.cache_hits > 0 {
                    let _ = write!(outcomes, " (cache hits {})", count(g.cache_hits));
                }
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    pair.name,
                    pair.load,
                    rate(g.requests_per_second),
                    g.latency_ms.map_or("–".into(), |l| ms(l.p50)),
                    g.latency_ms.map_or("–".into(), |l| ms(l.p99)),
                    cpu(g.gateway_cpu_ms_per_request),
                    count(g.errors),
                    outcomes,
                    d.map_or("–".into(), |d| rate(d.requests_per_second)),
                    d.and_then(|d| d.latency_ms)
                        .map_or("–".into(), |l| ms(l.p50)),
                    d.and_then(|d| d.latency_ms)
                        .map_or("–".into(), |l| ms(l.p99)),
                    overhead(g),
                    memory(g.gateway_memory),
                );
            }
        }

        let slow: Vec<&Pair> = self
            .scenarios
            .iter()
            .filter(|p| p.gateway.chunk_gap_ms.is_some() || p.name.starts_with("slow"))
            .collect();
        for pair in slow {
            let _ = writeln!(out);
            let _ = writeln!(out, "### {} ({})", pair.name, pair.load);
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "| target | streams | errors | TTFB p50 | gap p50 | gap p99 | gap max | stream p50 | stream p99 | CPU |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
            for s in pair.direct.iter().chain(std::iter::once(&pair.gateway)) {
                let gap = s.chunk_gap_ms;
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    s.target,
                    count(s.requests),
                    count(s.errors),
                    s.ttfb_ms.map_or("–".into(), |p| ms(p.p50)),
                    gap.map_or("–".into(), |p| ms(p.p50)),
                    gap.map_or("–".into(), |p| ms(p.p99)),
                    gap.map_or("–".into(), |p| ms(p.max)),
                    s.latency_ms.map_or("–".into(), |p| ms(p.p50)),
                    s.latency_ms.map_or("–".into(), |p| ms(p.p99)),
                    cpu(s.gateway_cpu_ms_per_request),
                );
            }
        }

        if let Some(first) = &self.streams {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "### Concurrent open streams (upstream: a chunk every second; clients: {})",
                first.clients
            );
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "| through | streams | connected | first chunk | open at peak | all first chunks after | completed | errors | TTFB p50 / p99 | VmRSS / VmHWM before | at peak | RSS per stream | CPU per stream | open files before / peak / after |"
            );
            let _ = writeln!(
                out,
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
            );
            for s in std::iter::once(first).chain(&self.bare_streams) {
                let files = s
                    .gateway_open_files
                    .iter()
                    .map(|f| f.map_or("–".into(), count))
                    .collect::<Vec<_>>()
                    .join(" / ");
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {files} |",
                    s.target,
                    count(s.requested as u64),
                    count(s.connected),
                    count(s.first_chunk),
                    count(s.open_peak),
                    if s.all_first {
                        format!("{:.1} s", s.all_first_after_seconds)
                    } else {
                        format!("not all ({:.1} s)", s.all_first_after_seconds)
                    },
                    count(s.completed),
                    count(s.errors),
                    p50_p99(s.ttfb_ms),
                    memory(s.gateway_before),
                    memory(s.gateway_at_peak),
                    s.rss_kb_per_stream
                        .map_or("–".into(), |v| format!("{v:.1} kB")),
                    cpu(s.gateway_cpu_ms_per_stream),
                );
            }
        }

        if let Some(end) = self.gateway_memory_end {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "Gateway memory at the end: VmRSS {}, VmHWM (peak) {}.",
                kb(end.rss_kb),
                kb(end.hwm_kb)
            );
        }
        let errors: Vec<String> = self
            .open_loop
            .iter()
            .chain(&self.throughput)
            .chain(&self.scenarios)
            .flat_map(|p| {
                p.summaries()
                    .filter(|s| !s.error_samples.is_empty())
                    .map(move |s| {
                        format!(
                            "{} / {} / {}: {}",
                            p.name,
                            p.load,
                            s.target,
                            s.error_samples.join("; ")
                        )
                    })
            })
            .chain(
                self.streams
                    .iter()
                    .chain(&self.bare_streams)
                    .filter(|s| !s.error_samples.is_empty())
                    .map(|s| format!("streams ({}): {}", s.target, s.error_samples.join("; "))),
            )
            .collect();
        if !self.problems.is_empty() || !errors.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "### Problems");
            let _ = writeln!(out);
            for problem in self.problems.iter().chain(&errors) {
                let _ = writeln!(out, "- {problem}");
            }
        }
        out
    }
}
