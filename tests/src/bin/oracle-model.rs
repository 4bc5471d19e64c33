//! Replays the oracle's random requests against the Xen model: the lines
//! the guest kernel prints under real Xen for the same seed, so that the
//! harness can compare the two transcripts line for line.
//!
//! Usage: `oracle-model <seed> <requests> dom0|domu [--blocks] [--trace]`;
//! with `--blocks`, one `ORACLE-BLOCK` line per block of requests instead
//! of the request lines (what the kernel prints by default); with
//! `--trace`, each request and the model's page type, type count, pin
//! (`P`), stuck half-validation (`S`) and entries of every pool frame
//! after it go to stderr.
//!
//! Invariant: the model plays the domain the kernel was (the hardware
//! domain for `--mode xen`, an unprivileged one for `--mode xl`); exit
//! status 0 unless the arguments are wrong or the model could not boot.

use hypercall::{MmuHypercalls, XenError};
use pvmmu::model::{DomainKind, ModelNegativeEnv};
use pvmmu::negative::NegativeEnv;
use pvmmu::oracle::{self, OracleEnv, Requests, POOL};
use pvmmu::{FrameMap, Mfn, Pfn, PhysMem};

/// The model's environment, printing the pool's type state after each
/// request when tracing.
struct Traced {
    env: ModelNegativeEnv,
    requests: Option<Requests>,
}

impl NegativeEnv for Traced {
    fn hypercalls(&mut self) -> &mut dyn MmuHypercalls {
        self.env.hypercalls()
    }
    fn phys_mem(&self) -> &dyn PhysMem {
        self.env.phys_mem()
    }
    fn frame_map(&self) -> &dyn FrameMap {
        self.env.frame_map()
    }
    fn allocate_frame(&mut self) -> Option<Pfn> {
        self.env.allocate_frame()
    }
    fn free_frame(&mut self, pfn: Pfn) {
        self.env.free_frame(pfn);
    }
    fn set_alias_writable(&mut self, pfn: Pfn, writable: bool) -> Result<(), XenError> {
        self.env.set_alias_writable(pfn, writable)
    }
    fn current_root(&self) -> Mfn {
        self.env.current_root()
    }
}

impl OracleEnv for Traced {
    fn window_va(&mut self) -> Option<u64> {
        self.env.window_va()
    }

    fn after_request(&mut self, index: u32, pool: &[u64; POOL]) {
        let Some(requests) = self.requests.as_mut() else {
            return;
        };
        let m = self.env.model();
        let types: Vec<String> = pool
            .iter()
            .enumerate()
            .map(|(n, &mfn)| {
                let mfn = Mfn(mfn);
                let entries: Vec<String> = oracle::INDICES
                    .iter()
                    .map(|&i| {
                        let e = m.read_entry(mfn, i).unwrap_or(0);
                        let target = (e & 0x000f_ffff_ffff_f000) >> 12;
                        match pool.iter().position(|&p| p == target) {
                            Some(k) if e != 0 => format!("{i}>p{k}:{:x}", e & 0xfff),
                            _ if e == 0 => String::new(),
                            _ => format!("{i}>{target:#x}:{:x}", e & 0xfff),
                        }
                    })
                    .filter(|s| !s.is_empty())
                    .collect();
                let stuck = m.stuck_tables().any(|s| s == mfn);
                format!(
                    "p{n}:{:?}/{}{}{}[{}]",
                    m.page_type(mfn),
                    m.type_count(mfn),
                    if m.is_pinned(mfn) { "P" } else { "" },
                    if stuck { "S" } else { "" },
                    entries.join(",")
                )
            })
            .collect();
        eprintln!(
            "{index}: {:?}\n    {}",
            requests.next_request(),
            types.join(" ")
        );
    }
}

fn parse_seed(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let trace = args.iter().any(|a| a == "--trace");
    let blocks = args.iter().any(|a| a == "--blocks");
    args.retain(|a| a != "--trace" && a != "--blocks");
    let parsed = match args.as_slice() {
        [seed, requests, domain] => {
            parse_seed(seed)
                .zip(requests.parse::<u32>().ok())
                .zip(match domain.as_str() {
                    "dom0" => Some(DomainKind::Hardware),
                    "domu" => Some(DomainKind::Unprivileged),
                    _ => None,
                })
        }
        _ => None,
    };
    let Some(((seed, requests), kind)) = parsed else {
        eprintln!("usage: oracle-model <seed> <requests> dom0|domu [--blocks] [--trace]");
        std::process::exit(2);
    };
    let env = match ModelNegativeEnv::new(kind, 16 * 1024) {
        Ok(env) => env,
        Err(e) => {
            eprintln!("oracle-model: the model could not boot: {e}");
            std::process::exit(1);
        }
    };
    let mut traced = Traced {
        env,
        requests: trace.then(|| Requests::new(seed)),
    };
    let mut folded = oracle::Blocks::new();
    let mut end = None;
    oracle::run(
        &mut traced,
        seed,
        requests,
        &mut |b| println!("{b}"),
        &mut |line| {
            if !blocks {
                println!("{line}");
            } else if let Some(block) = folded.push(line) {
                println!("{block}");
            }
        },
        &mut |e| end = Some(e),
    );
    if let Some(block) = folded.finish() {
        println!("{block}");
    }
    if let Some(e) = end {
        println!("{e}");
    }
}
