//! The processes under test and what the kernel says about them: building and spawning the
//! release binaries, CPU time and memory from `/proc`, the open-files limit and the machine.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::Method;
use serde::Serialize;

use crate::load::{self, Result};

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.join("../..");
    root.canonicalize().unwrap_or(root)
}

/// `CARGO_TARGET_DIR`, else `<root>/target`.
pub fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                root.join(dir)
            }
        }
        _ => root.join("target"),
    }
}

/// Builds the gateway, the fake upstream and the bare proxy (this crate's `bare-proxy`) in
/// release mode with the cargo that runs us.
pub fn build_binaries(root: &Path) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let args = [
        "build",
        "--release",
        "-p",
        "meta-chat",
        "--bin",
        "meta-chat",
        "-p",
        "meta-chat-testkit",
        "--bin",
        "meta-chat-fake",
        "-p",
        "meta-chat-bench",
        "--bin",
        "bare-proxy",
    ];
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(root)
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {}: {e}", Path::new(&cargo).display()))?;
    if !status.success() {
        return Err(format!("cargo build failed ({status})").into());
    }
    Ok(())
}

/// A free loopback port for a child to listen on, each one given once. It is taken below
/// the range the kernel picks the local ports of outgoing connections from: a port from that
/// range, released here, could become the local end of one of the thousands of connections
/// the benchmark opens before the child binds it (which then fails with "address in use").
/// Ports from the kernel's own choice are the fallback.
pub fn free_port() -> Result<u16> {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, RandomState};
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().map_err(|_| "port registry poisoned")?;
    let given = given.get_or_insert_with(HashSet::new);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    const FLOOR: u16 = 10_000;
    if low > FLOOR + 1_000 {
        let random = RandomState::new();
        for attempt in 0u32..256 {
            let port = FLOOR + (random.hash_one(attempt) % u64::from(low - FLOOR)) as u16;
            if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return Ok(port);
            }
        }
    }
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    given.insert(port);
    Ok(port)
}

/// A child process under test.
#[derive(Debug)]
pub struct Proc {
    /// Short name (`gateway`, `fake-stream20`, …).
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its output.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// An error if it has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            return Err(format!(
                "{} exited ({status}); its last output:\n{}",
                self.name,
                self.log_tail(20)
            )
            .into());
        }
        Ok(())
    }
}

/// The children, killed when this is dropped — on success, on error and on Ctrl-C alike.
#[derive(Debug, Default)]
pub struct Procs(pub Vec<Proc>);

impl Procs {
    /// Starts `program` with exactly `env` (plus `PATH`), output to `<dir>/<name>.log`.
    pub fn spawn(
        &mut self,
        name: &str,
        addr: SocketAddr,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        dir: &Path,
    ) -> Result<&mut Proc> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some(path) = std::env::var_os("PATH") {
            command.env("PATH", path);
        }
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        self.0.push(Proc {
            name: name.to_owned(),
            addr,
            child,
            log,
        });
        let index = self.0.len() - 1;
        Ok(&mut self.0[index])
    }

    /// Waits until every child answers HTTP on `ready_path` (`/healthz` for the gateway, any
    /// status for the fakes) or one of them exits.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let give_up = Instant::now() + timeout;
        for proc in &mut self.0 {
            let path = if proc.name == "gateway" {
                "/healthz"
            } else {
                "/v1/models"
            };
            loop {
                proc.check_running()?;
                match load::once(proc.addr, Method::GET, path, None, None).await {
                    Ok((status, _, _)) if proc.name != "gateway" || status == 200 => break,
                    _ if Instant::now() > give_up => {
                        return Err(format!(
                            "{} not ready on {} after {timeout:?}; its last output:\n{}",
                            proc.name,
                            proc.addr,
                            proc.log_tail(20)
                        )
                        .into());
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        Ok(())
    }

    /// The child called `name`.
    pub fn get(&self, name: &str) -> Result<&Proc> {
        self.0
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| format!("no process {name}").into())
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for proc in &mut self.0 {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`, else 100).
pub fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .filter(|ticks| *ticks > 0)
        .unwrap_or(100)
}

/// User plus system CPU time of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    read_cpu_ticks(&format!("/proc/{pid}/stat"))
}

/// The same for this process.
pub fn own_cpu_ticks() -> Result<u64> {
    read_cpu_ticks("/proc/self/stat")
}

fn read_cpu_ticks(path: &str) -> Result<u64> {
    let stat = std::fs::read_to_string(path)?;
    // The command name (field 2) is in parentheses and may hold spaces; fields after it
    // start with the state (field 3), so utime (14) and stime (15) are the 12th and 13th.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| format!("{path}: too few fields"))?
            .parse::<u64>()?)
    };
    Ok(field(11)? + field(12)?)
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Memory {
    /// `VmRSS`, kB: resident now.
    pub rss_kb: u64,
    /// `VmHWM`, kB: the most it was ever resident.
    pub hwm_kb: u64,
}

/// `VmRSS` and `VmHWM` of a process.
pub fn memory(pid: u32) -> Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(Memory {
        rss_kb: kb("VmRSS:"),
        hwm_kb: kb("VmHWM:"),
    })
}

/// How many files (sockets included) a process has open.
pub fn open_files(pid: u32) -> Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64)
}

/// The soft open-files limit of this process (and of the children it starts).
pub fn file_limit() -> Result<u64> {
    Ok(rlimit::Resource::NOFILE.get()?.0)
}

/// What became of the open-files limit.
#[derive(Debug, Clone, Serialize)]
pub struct FileLimit {
    /// Soft and hard limit before.
    pub before: (u64, u64),
    /// Soft and hard limit now (inherited by the children).
    pub now: (u64, u64),
}

/// Raises `RLIMIT_NOFILE` to `wanted`: the soft limit up to the hard one, and the hard one
/// too where the process may (root); never lowers either.
pub fn raise_file_limit(wanted: u64) -> Result<FileLimit> {
    use rlimit::Resource;
    let before = Resource::NOFILE.get()?;
    let (soft, hard) = before;
    if soft < wanted {
        let new_hard = hard.max(wanted);
        if new_hard > hard && Resource::NOFILE.set(wanted, new_hard).is_ok() {
            // Raised both (privileged).
        } else {
            Resource::NOFILE.set(wanted.min(hard).max(soft), hard)?;
        }
    }
    Ok(FileLimit {
        before,
        now: Resource::NOFILE.get()?,
    })
}

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs available.
    pub nproc: usize,
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// `MemTotal`, kB.
    pub mem_total_kb: u64,
    /// `git rev-parse --short HEAD` of the workspace.
    pub git_commit: Option<String>,
    /// Whether the work tree had uncommitted changes.
    pub git_dirty: Option<bool>,
}

/// Reads the machine information; nothing here fails the run.
pub fn machine(root: &Path) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map_or_else(|| "unknown".to_owned(), |(_, v)| v.trim().to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
    let mem_total_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .args(args)
            .current_dir(root)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        kernel,
        mem_total_kb,
        git_commit: git(&["rev-parse", "--short", "HEAD"]),
        git_dirty: git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()),
    }
}
