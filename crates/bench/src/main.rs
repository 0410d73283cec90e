//! # meta-chat-bench
//!
//! A reproducible load benchmark of the gateway. `cargo run --release -p meta-chat-bench`
//! builds the release `meta-chat`, `meta-chat-fake` and `bare-proxy` binaries, starts one
//! gateway (SQLite in a temporary folder, `RUST_LOG=warn`) and several fake upstreams, each
//! answering every request the same way (echo; 20 chunks; a tool call; 20 chunks 20 ms
//! apart; 20 chunks 1 s apart), creates one tenant per upstream behaviour through the admin
//! API (a tenant reaches its upstream through `llm.baseUrl`), measures, prints markdown
//! tables and writes the figures as JSON (`target/bench/results.json`). The children are
//! killed when the run ends, fails or is interrupted.
//!
//! What is measured:
//!
//! - **Open loop at fixed rates** (500 and 2,000 requests/s by default), a ~1 KB
//!   non-streamed chat completion, straight to the fake and through the gateway. Request
//!   `i` is due at `t0 + i/rate` whatever the earlier answers do: a dedicated thread keeps
//!   the schedule and each request takes an idle keep-alive connection from a pool (opening
//!   another when none is idle), so a slow answer never delays the next request. Latency is
//!   counted from the intended send time, so stalls are not hidden (no coordinated
//!   omission); how late requests actually left is reported as the send lag. The same for
//!   a 100 KB request at 200 requests/s: what a large request adds, without queueing.
//! - **Maximum throughput, closed loop** (32 connections, each sending its next request when
//!   the previous answer was read in full), non-streamed and streamed (20 chunks), with the
//!   time to the first body bytes of streams.
//! - **The bare-proxy reference**, in the same throughput rounds: `bare-proxy` (this crate's
//!   plain axum + hyper-client pass-through, no JSON, no auth, no accounting) in front of the same
//!   fake, the floor of the gateway's HTTP stack: its req/s, ratio to direct and CPU/request.
//! - **Scenarios** through the gateway (closed loop), with the direct equivalent where one
//!   exists: a small and a 100 KB request, a tool call, embeddings, cache hits, rate-limit
//!   refusals (429 is the expected outcome), a wrong key (401 expected), a slow stream (the
//!   gaps between chunks as they arrive at the client, against the upstream's 20 ms), and
//!   thousands of concurrent open streams (`--streams`), with the gateway's memory while all
//!   of them are open; then the same streams through a bare proxy in front of the same slow
//!   fake, the HTTP stack's own memory per stream.
//!
//! Measurements are interleaved: each runs in rounds (4 × 3 s by default) that alternate the
//! direct, the bare-proxy (throughput only) and the gateway phase (ABBA order: reversed every
//! other round), and the phases of a target are merged into one histogram, so machine noise
//! affects all targets alike. Each measurement starts with a short warm-up that is not
//! counted.
//!
//! CPU time is `utime + stime` of the process from `/proc/<pid>/stat` (in `CLK_TCK` ticks,
//! normally 100 per second) read before and after each phase and divided by the answered
//! requests: for the gateway (the bare proxy in its phases), the fake upstream behind it and
//! the load generator itself.
//! Memory is `VmRSS` (now) and `VmHWM` (peak) from `/proc/<pid>/status`. The gateway's own
//! time per request comes from its `x-meta-chat-overhead-ms` response header and from the
//! `meta_chat_overhead_seconds` histogram of `/metrics`, when the gateway provides them.
//!
//! The load generator runs on a multi-threaded tokio runtime and sends pre-built request
//! bodies over HTTP/1.1 keep-alive connections with hyper's connection API. It shares the
//! machine's cores with the gateway and the fakes, so compare the rows of one run rather
//! than figures from different machines.

mod load;
mod report;
mod system;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use hyper::Method;
use serde_json::{Value, json};

use crate::load::{Call, Result, Stats};
use crate::report::{Costs, Pair, Pcts, Results, StreamsResult, Summary};
use crate::system::{Procs, cpu_ticks, memory, own_cpu_ticks};

/// The parts of a run, in the order they run.
/// Requests per second of the open-loop 100 KB measurement.
const LARGE_RATE: f64 = 200.0;
const PARTS: &[&str] = &[
    "open-loop",
    "throughput",
    "small",
    "large",
    "tools",
    "embeddings",
    "cache",
    "rate-limited",
    "invalid-key",
    "slow-stream",
    "streams",
];

const ADMIN_KEY: &str = "admin-bench-key-0123456789abcdef0123456789";
const CHAT: &str = "/v1/chat/completions";
const EMBEDDINGS: &str = "/v1/embeddings";

/// Load benchmark of the meta-chat gateway against fake upstreams.
#[derive(Debug, Parser)]
#[command(name = "meta-chat-bench", version, about)]
struct Args {
    /// Short phases for a smoke run (about a minute): 1 round of 1 s, 1,000 streams.
    #[arg(long)]
    quick: bool,
    /// Rounds per measurement, each running the direct and the gateway phase [default: 4,
    /// quick: 1].
    #[arg(long)]
    rounds: Option<u32>,
    /// Seconds per phase [default: 3, quick: 1].
    #[arg(long)]
    phase_seconds: Option<f64>,
    /// Rates of the open-loop measurement, requests per second.
    #[arg(long, value_delimiter = ',', default_value = "500,2000")]
    rates: Vec<f64>,
    /// Connections of the closed-loop measurements.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Concurrent streams of the `streams` part [default: 10000, quick: 1000].
    #[arg(long)]
    streams: Option<usize>,
    /// Only these parts, comma-separated: open-loop, throughput, small, large, tools,
    /// embeddings, cache, rate-limited, invalid-key, slow-stream, streams [default: all].
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Where to write the JSON results [default: target/bench/results.json].
    #[arg(long)]
    json: Option<PathBuf>,
    /// Do not build; use the release binaries already in the target folder.
    #[arg(long)]
    no_build: bool,
    /// How the `streams` part's clients connect: `http1` (a connection per stream, as SDKs
    /// do) or `h2c` (100 streams per HTTP/2 connection, as from a load balancer).
    #[arg(long, default_value = "http1")]
    stream_clients: String,
    /// The gateway's `UPSTREAM_HTTP2`: `prior-knowledge` (HTTP/2 to the fakes, as hosted
    /// APIs are reached over TLS), `auto` or `off` (HTTP/1.1 to the plain-HTTP fakes).
    #[arg(long, default_value = "prior-knowledge")]
    upstream_http2: String,
}

/// The options with their defaults applied.
#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    rounds: u32,
    phase: Duration,
    warmup: Duration,
    rates: Vec<f64>,
    connections: usize,
    streams: usize,
    parts: BTreeSet<String>,
    json: Option<PathBuf>,
    upstream_http2: String,
    stream_clients: load::StreamClients,
}

impl Plan {
    fn new(args: &Args) -> Result<Self> {
        let mut parts = BTreeSet::new();
        for part in &args.scenarios {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            if !PARTS.contains(&part) {
                return Err(format!(
                    "unknown scenario `{part}`; choose from {}",
                    PARTS.join(", ")
                )
                .into());
            }
            parts.insert(part.to_owned());
        }
        if parts.is_empty() {
            parts = PARTS.iter().map(|p| (*p).to_owned()).collect();
        }
        let phase = args
            .phase_seconds
            .unwrap_or(if args.quick { 1.0 } else { 3.0 });
        if !(phase.is_finite() && phase > 0.0) {
            return Err("--phase-seconds must be positive".into());
        }
        if args.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
            return Err("--rates must be positive numbers".into());
        }
        Ok(Self {
            quick: args.quick,
            rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 4 }).max(1),
            phase: Duration::from_secs_f64(phase),
            warmup: Duration::from_millis(if args.quick { 300 } else { 1000 }),
            rates: args.rates.clone(),
            connections: args.connections.max(1),
            streams: args
                .streams
                .unwrap_or(if args.quick { 1000 } else { 10_000 }),
            parts,
            json: args.json.clone(),
            upstream_http2: args.upstream_http2.clone(),
            stream_clients: match args.stream_clients.as_str() {
                "http1" => load::StreamClients::Http1,
                "h2c" => load::StreamClients::H2c(100),
                other => {
                    return Err(format!("--stream-clients: `{other}` is not http1 or h2c").into());
                }
            },
        })
    }

    fn has(&self, part: &str) -> bool {
        self.parts.contains(part)
    }
}

fn main() -> ExitCode {
    match run_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("meta-chat-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run_main() -> Result<()> {
    let args = Args::parse();
    let plan = Plan::new(&args)?;
    let root = system::workspace_root();
    if !args.no_build {
        system::build_binaries(&root)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = run(plan, root) => outcome,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome
}

/// The fake upstreams: name and `meta-chat-fake` flags.
const FAKES: &[(&str, &[&str])] = &[
    ("fake", &[]),
    ("fake-stream20", &["--chunks", "20"]),
    ("fake-tools", &["--tool-calls"]),
    (
        "fake-slow20ms",
        &["--chunks", "20", "--chunk-delay-ms", "20"],
    ),
    (
        "fake-slow1s",
        &["--chunks", "20", "--chunk-delay-ms", "1000"],
    ),
];

/// The fakes a `bare-proxy` is started in front of (for the throughput and the streams parts),
/// and the name of that proxy process.
const BARE_FRONTS: &[(&str, &str)] = &[
    ("fake", "bare-fake"),
    ("fake-stream20", "bare-fake-stream20"),
    (STREAMS_UPSTREAM, "bare-fake-slow1s"),
];

/// The fake the `streams` part's streams come from.
const STREAMS_UPSTREAM: &str = "fake-slow1s";

async fn run(plan: Plan, root: PathBuf) -> Result<()> {
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let target = system::target_dir(&root);
    let release = target.join("release");
    let gateway_bin = release.join("meta-chat");
    let fake_bin = release.join("meta-chat-fake");
    let bare_bin = release.join("bare-proxy");
    // The bare proxies serve the throughput and streams parts only.
    let bare_fronts: Vec<(&str, &str)> = BARE_FRONTS
        .iter()
        .filter(|(upstream, _)| {
            if *upstream == STREAMS_UPSTREAM {
                plan.has("streams")
            } else {
                plan.has("throughput")
            }
        })
        .copied()
        .collect();
    let needed = [&gateway_bin, &fake_bin]
        .into_iter()
        .chain((!bare_fronts.is_empty()).then_some(&bare_bin));
    for bin in needed {
        if !bin.is_file() {
            return Err(format!("{} is missing (run without --no-build)", bin.display()).into());
        }
    }
    let mut problems = Vec::new();

    // Children inherit the open-files limit, so it is raised before they start: the gateway
    // holds two sockets per stream (client and upstream), the fake and this process one.
    let mut file_limit = None;
    if plan.has("streams") {
        let wanted = plan.streams as u64 * 2 + 4096;
        match system::raise_file_limit(wanted) {
            Ok(limit) => {
                if limit.now.0 < wanted {
                    problems.push(format!(
                        "the open-files limit could be raised only to {} (hard limit {}), not to {wanted}",
                        limit.now.0, limit.now.1
                    ));
                }
                file_limit = Some(limit);
            }
            Err(error) => problems.push(format!("cannot raise the open-files limit: {error}")),
        }
    }

    let dir = tempfile::Builder::new()
        .prefix("meta-chat-bench-")
        .tempdir()?;
    let mut procs = Procs::default();
    let mut fake_addrs = Vec::new();
    for (name, flags) in FAKES {
        let addr: SocketAddr = format!("127.0.0.1:{}", system::free_port()?).parse()?;
        let mut args: Vec<String> = vec!["--bind".into(), addr.to_string()];
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        procs.spawn(
            name,
            addr,
            &fake_bin,
            &args,
            &[("RUST_LOG", "warn".into())],
            dir.path(),
        )?;
        fake_addrs.push((*name, addr));
    }
    let fake = |name: &str| -> Result<SocketAddr> {
        fake_addrs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
            .ok_or_else(|| format!("no fake {name}").into())
    };
    let gateway_addr: SocketAddr = format!("127.0.0.1:{}", system::free_port()?).parse()?;
    let database = dir.path().join("bench.db");
    procs.spawn(
        "gateway",
        gateway_addr,
        &gateway_bin,
        &["serve".to_owned()],
        &[
            ("ADMIN_API_KEY", ADMIN_KEY.into()),
            ("OPENAI_API_KEY", "fake".into()),
            ("OPENAI_BASE_URL", format!("http://{}", fake("fake")?)),
            ("BIND_ADDR", gateway_addr.to_string()),
            ("DATABASE_URL", format!("sqlite://{}", database.display())),
            ("UPSTREAM_HTTP2", plan.upstream_http2.clone()),
            ("RUST_LOG", "warn".into()),
        ],
        dir.path(),
    )?;
    let mut bare_addrs = Vec::new();
    for (upstream, name) in &bare_fronts {
        let addr: SocketAddr = format!("127.0.0.1:{}", system::free_port()?).parse()?;
        let mut args: Vec<String> = vec![
            "--bind".into(),
            addr.to_string(),
            "--upstream".into(),
            format!("http://{}", fake(upstream)?),
        ];
        if plan.upstream_http2 == "prior-knowledge" {
            args.push("--http2-prior-knowledge".into());
        }
        procs.spawn(
            name,
            addr,
            &bare_bin,
            &args,
            &[("RUST_LOG", "warn".into())],
            dir.path(),
        )?;
        bare_addrs.push((*upstream, *name, addr));
    }
    eprintln!(
        "starting the gateway, {} fake upstreams and {} bare proxies…",
        FAKES.len(),
        bare_addrs.len()
    );
    procs.wait_ready(Duration::from_secs(60)).await?;

    let gateway_pid = procs.get("gateway")?.pid();
    let pids: Vec<(String, u32)> = procs.0.iter().map(|p| (p.name.clone(), p.pid())).collect();
    let pid_of = |name: &str| -> Result<u32> {
        pids.iter()
            .find(|(n, _)| n == name)
            .map(|(_, pid)| *pid)
            .ok_or_else(|| format!("no process {name}").into())
    };
    let base = json!({"provider": "openai", "model": "gpt-4o-mini"});
    let with_url = |name: &str| -> Result<Value> {
        let mut llm = base.clone();
        llm["baseUrl"] = json!(format!("http://{}", fake(name)?));
        Ok(json!({ "llm": llm }))
    };
    let key_main = create_tenant(gateway_addr, "bench-main", json!({ "llm": base })).await?;
    let key_stream20 =
        create_tenant(gateway_addr, "bench-stream20", with_url("fake-stream20")?).await?;
    let key_tools = create_tenant(gateway_addr, "bench-tools", with_url("fake-tools")?).await?;
    let key_cache = create_tenant(
        gateway_addr,
        "bench-cache",
        json!({"llm": base, "cache": {"enabled": true, "ttlSeconds": 3600}}),
    )
    .await?;
    let key_limited = create_tenant(
        gateway_addr,
        "bench-limited",
        json!({"llm": base, "rateLimit": {"requestsPerMinute": 1}}),
    )
    .await?;
    let key_slow20 =
        create_tenant(gateway_addr, "bench-slow20ms", with_url("fake-slow20ms")?).await?;
    let key_slow1s = create_tenant(gateway_addr, "bench-slow1s", with_url("fake-slow1s")?).await?;

    let bench = Bench {
        gateway_pid,
        gateway_addr,
        ticks_per_second: system::clock_ticks_per_second(),
        rounds: plan.rounds,
        phase: plan.phase,
        warmup: plan.warmup,
        timeout: Duration::from_secs(60),
    };
    let small = Bytes::from(small_chat(json!({})).to_string());
    let small_stream = Bytes::from(
        small_chat(json!({"stream": true, "stream_options": {"include_usage": true}})).to_string(),
    );
    let side = |addr: SocketAddr, path: &'static str, key: &str, body: &Bytes, upstream: &str| {
        Ok::<_, load::Error>(Side {
            call: Arc::new(Call::post(addr, path, key, body.clone())?),
            upstream_pid: pid_of(upstream)?,
            proxy_pid: None,
        })
    };
    // The same call straight to the fake `upstream` and through the gateway with `key`.
    let compared = |path: &'static str, key: &str, body: &Bytes, upstream: &str| {
        Ok::<_, load::Error>((
            Some(side(fake(upstream)?, path, "fake", body, upstream)?),
            side(gateway_addr, path, key, body, upstream)?,
        ))
    };
    // The same call as `compared`, plus through the bare proxy in front of `upstream`.
    let with_bare = |path: &'static str, key: &str, body: &Bytes, upstream: &str| {
        let (direct, gateway) = compared(path, key, body, upstream)?;
        let (_, name, addr) = bare_addrs
            .iter()
            .find(|(u, _, _)| *u == upstream)
            .ok_or_else(|| format!("no bare proxy in front of {upstream}"))?;
        let bare = Side {
            proxy_pid: Some(pid_of(name)?),
            ..side(*addr, path, "fake", body, upstream)?
        };
        Ok::<_, load::Error>(Sides {
            direct,
            bare: Some(bare),
            gateway,
        })
    };
    let conns = plan.connections;
    let closed = Load::Closed(conns);

    let mut results = Results {
        machine: system::machine(&root),
        started_unix,
        settings: json!({
            "quick": plan.quick,
            "rounds": plan.rounds,
            "phase_seconds": plan.phase.as_secs_f64(),
            "warmup_seconds": plan.warmup.as_secs_f64(),
            "rates": plan.rates,
            "connections": plan.connections,
            "streams": plan.streams,
            "upstream_http2": plan.upstream_http2,
            "stream_clients": format!("{:?}", plan.stream_clients),
            "parts": plan.parts,
            "summary": format!(
                "{} round(s) × {} s per target, {} connections",
                plan.rounds,
                plan.phase.as_secs_f64(),
                plan.connections
            ),
        }),
        file_limit,
        open_loop: Vec::new(),
        throughput: Vec::new(),
        scenarios: Vec::new(),
        streams: None,
        bare_streams: None,
        gateway_memory_end: None,
        problems: Vec::new(),
    };

    let mut failed = None;
    for part in PARTS.iter().filter(|p| plan.has(p)) {
        eprintln!("== {part}");
        let outcome: Result<()> = async {
            match *part {
                "open-loop" => {
                    for rate in &plan.rates {
                        let pair = bench
                            .measure(
                                "non-stream chat (~1 KB)",
                                compared(CHAT, &key_main, &small, "fake")?,
                                Load::Open(*rate),
                                None,
                            )
                            .await?;
                        results.open_loop.push(pair);
                    }
                    // What a 100 KB request adds, without queueing: a fixed rate far below
                    // saturation.
                    let body = Bytes::from(large_chat().to_string());
                    let name = format!("large request ({} KB, 50 messages)", body.len() / 1024);
                    let pair = bench
                        .measure(
                            &name,
                            compared(CHAT, &key_main, &body, "fake")?,
                            Load::Open(LARGE_RATE),
                            None,
                        )
                        .await?;
                    results.open_loop.push(pair);
                }
                "throughput" => {
                    let pair = bench
                        .measure(
                            "non-stream (~1 KB)",
                            with_bare(CHAT, &key_main, &small, "fake")?,
                            closed,
                            None,
                        )
                        .await?;
                    results.throughput.push(pair);
                    let sides = with_bare(CHAT, &key_stream20, &small_stream, "fake-stream20")?;
                    let pair = bench
                        .measure(
                            "stream, 20 chunks",
                            sides.map(|s| s.streamed(false)),
                            closed,
                            None,
                        )
                        .await?;
                    results.throughput.push(pair);
                }
                "small" => {
                    let pair = bench
                        .measure(
                            "small request (~1 KB)",
                            compared(CHAT, &key_main, &small, "fake")?,
                            closed,
                            None,
                        )
                        .await?;
                    results.scenarios.push(pair);
                }
                "large" => {
                    let body = Bytes::from(large_chat().to_string());
                    let name = format!("large request ({} KB, 50 messages)", body.len() / 1024);
                    let pair = bench
                        .measure(
                            &name,
                            compared(CHAT, &key_main, &body, "fake")?,
                            closed,
                            None,
                        )
                        .await?;
                    results.scenarios.push(pair);
                }
                "tools" => {
                    let body = Bytes::from(small_chat(tools()).to_string());
                    let pair = bench
                        .measure(
                            "tool call",
                            compared(CHAT, &key_tools, &body, "fake-tools")?,
                            closed,
                            Some("\"tool_calls\""),
                        )
                        .await?;
                    results.scenarios.push(pair);
                }
                "embeddings" => {
                    let body = Bytes::from(embeddings_body().to_string());
                    let pair = bench
                        .measure(
                            "embeddings (4 inputs)",
                            compared(EMBEDDINGS, &key_main, &body, "fake")?,
                            closed,
                            Some("\"embedding\""),
                        )
                        .await?;
                    results.scenarios.push(pair);
                }
                "cache" => {
                    let pair = bench
                        .measure(
                            "cache hit",
                            (None, side(gateway_addr, CHAT, &key_cache, &small, "fake")?),
                            closed,
                            None,
                        )
                        .await?;
                    if pair.gateway.cache_hits < pair.gateway.requests {
                        results.problems.push(format!(
                            "cache hit: only {} of {} answers were cache hits",
                            pair.gateway.cache_hits, pair.gateway.requests
                        ));
                    }
                    results.scenarios.push(pair);
                }
                "rate-limited" => {
                    let gateway = side(gateway_addr, CHAT, &key_limited, &small, "fake")?
                        .expecting(&[429, 200]);
                    let pair = bench
                        .measure("rate-limited (429)", (None, gateway), closed, None)
                        .await?;
                    results.scenarios.push(pair);
                }
                "invalid-key" => {
                    let gateway =
                        side(gateway_addr, CHAT, "wrong-key", &small, "fake")?.expecting(&[401]);
                    let pair = bench
                        .measure("invalid key (401)", (None, gateway), closed, None)
                        .await?;
                    results.scenarios.push(pair);
                }
                "slow-stream" => {
                    let (direct, gateway) =
                        compared(CHAT, &key_slow20, &small_stream, "fake-slow20ms")?;
                    let pair = bench
                        .measure(
                            "slow stream: 20 chunks 20 ms apart",
                            (direct.map(|s| s.streamed(true)), gateway.streamed(true)),
                            closed,
                            None,
                        )
                        .await?;
                    results.scenarios.push(pair);
                }
                "streams" => {
                    // Two descriptors per stream in the gateway, on top of what it holds now.
                    let limit = system::file_limit()?;
                    let held = system::open_files(gateway_pid)?;
                    let fit = limit.saturating_sub(held + 256) / 2;
                    let mut streams = plan.streams;
                    if streams as u64 > fit {
                        results.problems.push(format!(
                            "the open-files limit {limit} (the gateway holds {held} already, and \
                             needs two per stream) allows {fit} streams: measuring {fit} instead \
                             of {streams}"
                        ));
                        streams = usize::try_from(fit).unwrap_or(0);
                    }
                    let call = Call::post(gateway_addr, CHAT, &key_slow1s, small_stream.clone())?
                        .streamed(false);
                    results.streams = Some(
                        bench
                            .many_streams(
                                "gateway",
                                gateway_pid,
                                call,
                                streams,
                                plan.stream_clients,
                            )
                            .await?,
                    );
                    // The same streams through the bare proxy: the HTTP stack's own share.
                    if let Some((_, name, addr)) =
                        bare_addrs.iter().find(|(u, ..)| *u == STREAMS_UPSTREAM)
                    {
                        let call =
                            Call::post(*addr, CHAT, "fake", small_stream.clone())?.streamed(false);
                        results.bare_streams = Some(
                            bench
                                .many_streams(
                                    "bare proxy",
                                    pid_of(name)?,
                                    call,
                                    streams,
                                    plan.stream_clients,
                                )
                                .await?,
                        );
                    }
                }
                _ => {}
            }
            Ok::<(), load::Error>(())
        }
        .await;
        if let Err(error) = outcome {
            eprintln!("   {part} failed: {error}");
            results.problems.push(format!("{part}: {error}"));
        }
        if let Err(error) = procs.0.iter_mut().try_for_each(system::Proc::check_running) {
            results.problems.push(error.to_string());
            failed = Some(error);
            break;
        }
    }
    results.gateway_memory_end = memory(gateway_pid).ok();
    results.problems.splice(0..0, problems);

    println!("{}", results.table());
    let json_path = plan
        .json
        .clone()
        .unwrap_or_else(|| target.join("bench").join("results.json"));
    write_json(&json_path, &results)?;
    eprintln!("results written to {}", json_path.display());
    drop(procs);
    match failed {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

fn write_json(path: &Path, results: &Results) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(results)?)?;
    Ok(())
}

/// Creates a tenant and returns its API key.
async fn create_tenant(gateway: SocketAddr, name: &str, settings: Value) -> Result<String> {
    let body = json!({"name": name, "settings": settings}).to_string();
    let (status, _, answer) = load::once(
        gateway,
        Method::POST,
        "/api/tenants",
        Some(ADMIN_KEY),
        Some(Bytes::from(body)),
    )
    .await?;
    if !(200..300).contains(&status) {
        return Err(format!(
            "creating tenant {name} with {settings}: HTTP {status}: {}",
            String::from_utf8_lossy(&answer)
        )
        .into());
    }
    let answer: Value = serde_json::from_slice(&answer)?;
    answer
        .get("apiKey")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("creating tenant {name}: no apiKey in the answer").into())
}

/// Text of `len` characters.
fn filler(len: usize) -> String {
    const TEXT: &str = "The quick brown fox jumps over the lazy dog while the gateway routes \
                        every request to its provider. ";
    TEXT.chars().cycle().take(len).collect()
}

/// A chat request of about 1 KB, `extra` fields included.
fn small_chat(extra: Value) -> Value {
    let build = |user_len: usize| {
        let mut body = json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": format!("You are a helpful assistant. {}", filler(250))},
                {"role": "user", "content": filler(user_len)},
            ],
            "max_tokens": 256,
            "temperature": 0.2,
        });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        body
    };
    let base = build(0).to_string().len();
    build(1024usize.saturating_sub(base).max(40))
}

/// 50 messages of 2 KB each (about 100 KB), alternating user and assistant, ending on the
/// user.
fn large_chat() -> Value {
    let messages: Vec<Value> = (0..50)
        .map(|i| {
            let role = if i % 2 == 0 { "assistant" } else { "user" };
            json!({"role": role, "content": format!("{i:02} {}", filler(2045))})
        })
        .collect();
    json!({"model": "gpt-4o-mini", "messages": messages, "max_tokens": 256})
}

/// The `tools` of the tool-call scenario.
fn tools() -> Value {
    json!({
        "tools": [{
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The current weather in a city.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "description": "The city."},
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    },
                    "required": ["city"],
                },
            },
        }],
        "tool_choice": "auto",
    })
}

/// Four inputs of about 200 characters.
fn embeddings_body() -> Value {
    let inputs: Vec<String> = (0..4).map(|i| format!("{i} {}", filler(200))).collect();
    json!({"model": "text-embedding-3-small", "input": inputs})
}

/// One target of a measurement: what to send and which fake answers behind it.
#[derive(Debug, Clone)]
struct Side {
    call: Arc<Call>,
    upstream_pid: u32,
    /// The bare proxy between the client and the fake, whose CPU time its phases measure.
    proxy_pid: Option<u32>,
}

impl Side {
    /// The same call, streamed ([`Call::streamed`]).
    fn streamed(self, gaps: bool) -> Self {
        Self {
            call: Arc::new((*self.call).clone().streamed(gaps)),
            ..self
        }
    }

    /// The same call, with these statuses as its expected outcome ([`Call::expecting`]).
    fn expecting(self, statuses: &[u16]) -> Self {
        Self {
            call: Arc::new((*self.call).clone().expecting(statuses)),
            ..self
        }
    }
}

/// The targets of one measurement: straight to the fake (when there is an equivalent),
/// through the bare proxy (the throughput part) and through the gateway.
#[derive(Debug, Clone)]
struct Sides {
    direct: Option<Side>,
    bare: Option<Side>,
    gateway: Side,
}

impl From<(Option<Side>, Side)> for Sides {
    /// Direct (or none) and gateway, no bare proxy.
    fn from((direct, gateway): (Option<Side>, Side)) -> Self {
        Self {
            direct,
            bare: None,
            gateway,
        }
    }
}

impl Sides {
    /// The same targets, each changed by `f`.
    fn map(self, f: impl Fn(Side) -> Side) -> Self {
        Self {
            direct: self.direct.map(&f),
            bare: self.bare.map(&f),
            gateway: f(self.gateway),
        }
    }

    /// The side of `target`, if the measurement has it.
    fn get(&self, target: Target) -> Option<&Side> {
        match target {
            Target::Direct => self.direct.as_ref(),
            Target::Bare => self.bare.as_ref(),
            Target::Gateway => Some(&self.gateway),
        }
    }

    /// The targets present, in phase order.
    fn present(&self) -> impl Iterator<Item = (Target, &Side)> {
        Target::ALL
            .into_iter()
            .filter_map(|target| self.get(target).map(|side| (target, side)))
    }
}

/// Where a phase sends its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Straight to the fake upstream.
    Direct,
    /// Through the bare proxy in front of the fake.
    Bare,
    /// Through the gateway.
    Gateway,
}

impl Target {
    /// Phase order of even rounds (odd rounds run it reversed).
    const ALL: [Self; 3] = [Self::Direct, Self::Bare, Self::Gateway];

    /// `direct`, `bare-proxy` or `gateway` (the `target` of its [`Summary`]).
    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Bare => "bare-proxy",
            Self::Gateway => "gateway",
        }
    }
}

/// How a measurement drives its requests.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// This many connections, closed loop.
    Closed(usize),
    /// This many requests per second, open loop.
    Open(f64),
}

impl Load {
    fn label(self) -> String {
        match self {
            Self::Closed(n) => format!("closed loop, {n} conns"),
            Self::Open(rate) => format!("{rate}/s"),
        }
    }
}

/// What every measurement shares.
#[derive(Debug)]
struct Bench {
    gateway_pid: u32,
    gateway_addr: SocketAddr,
    ticks_per_second: u64,
    rounds: u32,
    phase: Duration,
    warmup: Duration,
    timeout: Duration,
}

/// Stats and costs of one target over its phases.
#[derive(Debug)]
struct Accumulated {
    stats: Stats,
    costs: Costs,
    phases: u32,
}

impl Bench {
    /// Checks each target with one request (the expected status, and `must_contain` in a
    /// 200 answer), warms them up, then runs the rounds: direct, bare-proxy and gateway
    /// phases in ABBA order (reversed every other round), merged per target.
    async fn measure(
        &self,
        name: &str,
        sides: impl Into<Sides>,
        load: Load,
        must_contain: Option<&str>,
    ) -> Result<Pair> {
        let sides = sides.into();
        for (target, side) in sides.present() {
            let label = target.label();
            let (status, _, body) = load::probe(&side.call)
                .await
                .map_err(|e| format!("{label}: {e}"))?;
            let text = String::from_utf8_lossy(&body);
            if !side.call.expect.contains(&status) {
                return Err(format!(
                    "{label} answered HTTP {status} instead of {:?}: {}",
                    side.call.expect,
                    text.chars().take(300).collect::<String>()
                )
                .into());
            }
            if let Some(needle) = must_contain.filter(|_| status == 200)
                && !text.contains(needle)
            {
                return Err(format!(
                    "{label}: the answer lacks {needle}: {}",
                    text.chars().take(300).collect::<String>()
                )
                .into());
            }
        }
        if !self.warmup.is_zero() {
            for (_, side) in sides.present() {
                let warm = match load {
                    Load::Closed(n) => n.min(8),
                    Load::Open(_) => 8,
                };
                load::closed_loop(side.call.clone(), warm, self.warmup, self.timeout).await?;
            }
        }
        let fresh = || -> Result<Accumulated> {
            Ok(Accumulated {
                stats: Stats::new()?,
                costs: Costs::default(),
                phases: 0,
            })
        };
        let mut on_direct = fresh()?;
        let mut on_bare = fresh()?;
        let mut on_gateway = fresh()?;
        for round in 0..self.rounds {
            let mut order = Target::ALL;
            if !round.is_multiple_of(2) {
                order.reverse();
            }
            for target in order {
                let Some(side) = sides.get(target) else {
                    continue;
                };
                let acc = match target {
                    Target::Direct => &mut on_direct,
                    Target::Bare => &mut on_bare,
                    Target::Gateway => &mut on_gateway,
                };
                self.phase(side, target, load, acc).await?;
                let s = &acc.stats;
                eprintln!(
                    "   {name} [{}] round {}/{} {}: {} ok, {} errors, {:.0} req/s so far, p50 {:.3} ms, p99 {:.3} ms",
                    load.label(),
                    round + 1,
                    self.rounds,
                    target.label(),
                    s.completed,
                    s.errors,
                    s.completed as f64 / s.elapsed.as_secs_f64().max(1e-9),
                    s.latency.value_at_quantile(0.5) as f64 / 1000.0,
                    s.latency.value_at_quantile(0.99) as f64 / 1000.0,
                );
            }
        }
        let summary = |target: Target, acc: &Accumulated| {
            Summary::new(
                target.label(),
                acc.phases,
                &acc.stats,
                &acc.costs,
                target == Target::Gateway,
                self.ticks_per_second,
            )
        };
        Ok(Pair {
            name: name.to_owned(),
            load: load.label(),
            direct: sides
                .direct
                .as_ref()
                .map(|_| summary(Target::Direct, &on_direct)),
            bare: sides.bare.as_ref().map(|_| summary(Target::Bare, &on_bare)),
            gateway: summary(Target::Gateway, &on_gateway),
        })
    }

    /// One phase against one target, with the CPU time of the processes involved.
    async fn phase(
        &self,
        side: &Side,
        target: Target,
        load: Load,
        acc: &mut Accumulated,
    ) -> Result<()> {
        let through_gateway = target == Target::Gateway;
        let proxy_pid = match target {
            Target::Bare => Some(
                side.proxy_pid
                    .ok_or("a bare-proxy phase without the proxy's pid")?,
            ),
            Target::Direct | Target::Gateway => None,
        };
        let metric_before = if through_gateway {
            overhead_metric(self.gateway_addr).await
        } else {
            None
        };
        let gateway0 = cpu_ticks(self.gateway_pid)?;
        let proxy0 = proxy_pid.map(cpu_ticks).transpose()?;
        let upstream0 = cpu_ticks(side.upstream_pid)?;
        let own0 = own_cpu_ticks()?;
        let stats = match load {
            Load::Closed(n) => {
                load::closed_loop(side.call.clone(), n, self.phase, self.timeout).await?
            }
            Load::Open(rate) => {
                let pool = 32usize.max((rate / 20.0) as usize);
                load::open_loop(side.call.clone(), rate, self.phase, pool, self.timeout).await?
            }
        };
        let gateway1 = cpu_ticks(self.gateway_pid)?;
        let proxy1 = proxy_pid.map(cpu_ticks).transpose()?;
        let upstream1 = cpu_ticks(side.upstream_pid)?;
        let own1 = own_cpu_ticks()?;
        let costs = &mut acc.costs;
        if through_gateway {
            costs.gateway_ticks += gateway1.saturating_sub(gateway0);
            costs.memory = memory(self.gateway_pid).ok();
            let metric_after = overhead_metric(self.gateway_addr).await;
            if let (Some((sum0, count0)), Some((sum1, count1))) = (metric_before, metric_after) {
                let (sum, count) = costs.metric.unwrap_or((0.0, 0.0));
                costs.metric = Some((sum + sum1 - sum0, count + count1 - count0));
            }
        }
        if let (Some(proxy0), Some(proxy1)) = (proxy0, proxy1) {
            *costs.bare_ticks.get_or_insert(0) += proxy1.saturating_sub(proxy0);
        }
        costs.upstream_ticks += upstream1.saturating_sub(upstream0);
        costs.bench_ticks += own1.saturating_sub(own0);
        acc.stats.merge(&stats)?;
        acc.phases += 1;
        Ok(())
    }

    /// Opens `n` streams through `target` (process `pid`) at once and reads its memory while
    /// all are open.
    async fn many_streams(
        &self,
        target: &str,
        pid: u32,
        call: Call,
        n: usize,
        clients: load::StreamClients,
    ) -> Result<StreamsResult> {
        let before = memory(pid).ok();
        let files_before = system::open_files(pid).ok();
        let gateway0 = cpu_ticks(pid)?;
        eprintln!("   opening {n} streams through the {target}…");
        let (streams, at_peak) = load::many_streams(
            Arc::new(call),
            n,
            256,
            Duration::from_secs(60),
            Duration::from_secs(120),
            clients,
            move || (memory(pid).ok(), system::open_files(pid).ok()),
        )
        .await?;
        let (at_peak, files_at_peak) = at_peak;
        let gateway1 = cpu_ticks(pid)?;
        let files_after = system::open_files(pid).ok();
        let stats = &streams.stats;
        eprintln!(
            "   {} connected, {} got a first chunk ({:.1} s), {} open at peak, {} completed, {} errors",
            streams.connected,
            streams.first_chunk,
            streams.all_first_after.as_secs_f64(),
            streams.open_peak,
            stats.completed,
            stats.errors
        );
        let rss_kb_per_stream = match (before, at_peak) {
            (Some(before), Some(peak)) if streams.open_peak > 0 => {
                Some((peak.rss_kb as f64 - before.rss_kb as f64) / streams.open_peak as f64)
            }
            _ => None,
        };
        Ok(StreamsResult {
            target: target.to_owned(),
            clients: match clients {
                load::StreamClients::Http1 => "HTTP/1.1, a connection per stream".to_owned(),
                load::StreamClients::H2c(n) => format!("h2c, {n} streams per connection"),
            },
            requested: streams.requested,
            connected: streams.connected,
            first_chunk: streams.first_chunk,
            open_peak: streams.open_peak,
            all_first: streams.all_first,
            all_first_after_seconds: streams.all_first_after.as_secs_f64(),
            completed: stats.completed,
            errors: stats.errors,
            ttfb_ms: Pcts::of(&stats.ttfb),
            stream_ms: Pcts::of(&stats.latency),
            gateway_before: before,
            gateway_at_peak: at_peak,
            gateway_open_files: [files_before, files_at_peak, files_after],
            rss_kb_per_stream,
            gateway_cpu_ms_per_stream: (stats.completed > 0).then(|| {
                gateway1.saturating_sub(gateway0) as f64 * 1000.0
                    / self.ticks_per_second as f64
                    / stats.completed as f64
            }),
            statuses: stats
                .statuses
                .iter()
                .map(|(s, n)| (s.to_string(), *n))
                .collect(),
            error_samples: stats.error_samples.clone(),
        })
    }
}

/// Sum (seconds) and count of `meta_chat_overhead_seconds` over all its label sets, when
/// the gateway exports it.
async fn overhead_metric(gateway: SocketAddr) -> Option<(f64, f64)> {
    let (status, _, body) = load::once(gateway, Method::GET, "/metrics", None, None)
        .await
        .ok()?;
    if status != 200 {
        return None;
    }
    let text = String::from_utf8_lossy(&body);
    let mut sum = None;
    let mut count = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        // Label values may hold spaces: the value follows the closing brace.
        let split = match line.rfind('}') {
            Some(brace) => Some((&line[..=brace], &line[brace + 1..])),
            None => line.split_once(' '),
        };
        let Some((series, value)) = split else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        let Ok(value) = value.split_whitespace().next().unwrap_or("").parse::<f64>() else {
            continue;
        };
        match name {
            "meta_chat_overhead_seconds_sum" => *sum.get_or_insert(0.0) += value,
            "meta_chat_overhead_seconds_count" => *count.get_or_insert(0.0) += value,
            _ => {}
        }
    }
    Some((sum?, count?))
}
