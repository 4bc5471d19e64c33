//! The `PVMMU-REPORT {json}` line the harness and benchmarks parse.
//!
//! Invariant: exactly one report line per boot, one JSON object on one line,
//! with every key of DESIGN.md present (figures not yet measured are 0,
//! `hypercalls` is always the real count).

use core::fmt::{self, Write};

use crate::platform::{HypervisorSignature, Platform, XenDomain};

/// The figures of one boot.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// Where we ran.
    pub platform: Platform,
    /// Guest RAM in MiB (rounded to nearest).
    pub mem_mib: u64,
    /// 4 KiB pages of RAM reachable through the direct map.
    pub pages_mapped: u64,
    /// Page-table frames created by the bootstrap.
    pub tables_created: u64,
    /// Hypercalls issued from entry to the report.
    pub hypercalls: u64,
    /// `mmu_update` entries issued from entry to the report.
    pub mmu_update_entries: u64,
    /// TSC cycles of the direct-map bootstrap.
    pub map_cycles: u64,
    /// Rounds the direct-map bootstrap took.
    pub bootstrap_rounds: u64,
    /// Hypercalls the bootstrap issued (PV).
    pub bootstrap_hypercalls: u64,
    /// `mmu_update` entries the bootstrap issued (PV).
    pub bootstrap_entries: u64,
    /// Self-tests passed.
    pub selftests_passed: u64,
    /// Self-tests failed.
    pub selftests_failed: u64,
    /// Operations of the randomized stress (`stress.rs`).
    pub random_ops: u64,
    /// Its steps that disagreed with the reference map.
    pub random_mismatches: u64,
    /// Its seed (`pvmmu.seed=` replays it).
    pub random_seed: u64,
    /// Requests of the oracle's random differential against Xen (PV only).
    pub oracle_requests: u64,
    /// Xen PV: dom0 or domU.
    pub xen_domain: Option<XenDomain>,
    /// Hypervisor CPUID signature seen (PVH entry only).
    pub hypervisor: Option<HypervisorSignature>,
    /// CPUs running the kernel.
    pub cpus: u64,
    /// CPUs the platform offered (vCPUs, or enabled MADT entries).
    pub cpus_offered: u64,
    /// Timer interrupts taken.
    pub timer_irqs: u64,
    /// Thread switches.
    pub context_switches: u64,
    /// Threads created (main and idle included).
    pub threads: u64,
    /// Switches forced at interrupt return.
    pub preemptions: u64,
    /// Interrupts taken (native IRQs, PV event upcalls).
    pub interrupts: u64,
    /// Thread switches that moved a thread to another CPU.
    pub migrations: u64,
    /// Threads moved from another CPU's run queue (idle steals and the
    /// tick's balance pulls).
    pub sched_steals: u64,
    /// Wake-ups that queued a thread on another CPU (each with an IPI).
    pub sched_remote_wakeups: u64,
    /// Inter-processor interrupts sent (reschedule and shootdown).
    pub ipis: u64,
    /// Native TLB shootdowns initiated (under PV Xen does them: 0).
    pub shootdowns: u64,
    /// Rounds of the cross-CPU stale-translation tests.
    pub tlb_rounds: u64,
    /// Stale accesses those rounds saw (must be 0).
    pub tlb_stale: u64,
    /// Operations of the concurrent SMP stress (`smp_stress.rs`).
    pub smp_stress_ops: u64,
    /// change_page_attr calls that succeeded on the live tree.
    pub cpa_calls: u64,
    /// Large pages CPA split.
    pub cpa_splits: u64,
    /// CPA calls done on the lockless path (natively; 0 under PV).
    pub cpa_fast: u64,
    /// CPA calls whose lockless check found a large page to split that
    /// the locked re-check found split by another CPU.
    pub cpa_split_races: u64,
    /// Faults the CPA self-test expected and took (write to RO, exec of NX).
    pub cpa_faults_verified: u64,
    /// Frames DEBUG_PAGEALLOC unmapped from the direct map (at free, and
    /// the free frames when it was switched on); 0 without it.
    pub pagealloc_unmaps: u64,
    /// Use-after-free faults the DEBUG_PAGEALLOC self-test expected and
    /// took.
    pub pagealloc_faults: u64,
    /// Lazy-MMU sections (outermost) ended.
    pub lazy_batches: u64,
    /// Of those, sections switched out at least once.
    pub lazy_batches_preempted: u64,
    /// Lazy sections resumed on another CPU.
    pub lazy_migrations: u64,
    /// The tick period the lazy stress ran with, us (0: not run).
    pub lazy_tick_us: u64,
    /// kmap_local calls that mapped a slot.
    pub kmaps: u64,
    /// Highest kmap depth per context: thread, interrupt, nested exception.
    pub kmap_max_depth: [u32; 3],
    /// kmap slots mapped for an incoming thread at a switch.
    pub kmap_switch_remaps: u64,
    /// Pattern mismatches the kmap tests saw (must be 0).
    pub kmap_mismatches: u64,
    /// kmap slot changes sent with the CPU's open lazy batch (PV).
    pub kmap_lazy_joins: u64,
    /// Frames above `pvmmu.directmap_limit` zeroed, filled and checked
    /// through kmap.
    pub highmem_frames_checked: u64,
}

impl Report {
    /// A report with every figure 0.
    pub const fn new(platform: Platform) -> Self {
        Report {
            platform,
            mem_mib: 0,
            pages_mapped: 0,
            tables_created: 0,
            hypercalls: 0,
            mmu_update_entries: 0,
            map_cycles: 0,
            bootstrap_rounds: 0,
            bootstrap_hypercalls: 0,
            bootstrap_entries: 0,
            selftests_passed: 0,
            selftests_failed: 0,
            random_ops: 0,
            random_mismatches: 0,
            oracle_requests: 0,
            random_seed: 0,
            xen_domain: None,
            hypervisor: None,
            cpus: 1,
            cpus_offered: 1,
            timer_irqs: 0,
            context_switches: 0,
            threads: 0,
            preemptions: 0,
            interrupts: 0,
            migrations: 0,
            sched_steals: 0,
            sched_remote_wakeups: 0,
            ipis: 0,
            shootdowns: 0,
            tlb_rounds: 0,
            tlb_stale: 0,
            smp_stress_ops: 0,
            cpa_calls: 0,
            cpa_splits: 0,
            cpa_fast: 0,
            cpa_split_races: 0,
            cpa_faults_verified: 0,
            pagealloc_unmaps: 0,
            pagealloc_faults: 0,
            lazy_batches: 0,
            lazy_batches_preempted: 0,
            lazy_migrations: 0,
            lazy_tick_us: 0,
            kmaps: 0,
            kmap_max_depth: [0; 3],
            kmap_switch_remaps: 0,
            kmap_mismatches: 0,
            kmap_lazy_joins: 0,
            highmem_frames_checked: 0,
        }
    }
}

/// A JSON string: the text with `"`, `\` and control bytes escaped.
struct JsonStr<'a>(&'a str);

impl fmt::Display for JsonStr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        for c in self.0.chars() {
            match c {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        f.write_char('"')
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{\"platform\":{}", JsonStr(self.platform.name()))?;
        if let Some(d) = self.xen_domain {
            write!(f, ",\"xen_domain\":{}", JsonStr(d.name()))?;
        }
        if let Some(h) = &self.hypervisor {
            write!(f, ",\"hypervisor\":{}", JsonStr(h.as_str()))?;
        }
        write!(
            f,
            ",\"mem_mib\":{},\"pages_mapped\":{},\"tables_created\":{},\"hypercalls\":{},\
             \"mmu_update_entries\":{},\"map_cycles\":{},\"bootstrap_rounds\":{},\
             \"bootstrap_hypercalls\":{},\"bootstrap_entries\":{},\"selftests_passed\":{},\
             \"selftests_failed\":{}",
            self.mem_mib,
            self.pages_mapped,
            self.tables_created,
            self.hypercalls,
            self.mmu_update_entries,
            self.map_cycles,
            self.bootstrap_rounds,
            self.bootstrap_hypercalls,
            self.bootstrap_entries,
            self.selftests_passed,
            self.selftests_failed
        )?;
        write!(
            f,
            ",\"random_ops\":{},\"random_mismatches\":{},\"random_seed\":{},\"oracle_requests\":{}",
            self.random_ops, self.random_mismatches, self.random_seed, self.oracle_requests
        )?;
        write!(
            f,
            ",\"cpus\":{},\"cpus_offered\":{},\"timer_irqs\":{},\"interrupts\":{},\"context_switches\":{},\
             \"preemptions\":{},\"threads\":{},\"migrations\":{},\"sched_steals\":{},\"sched_remote_wakeups\":{},\"ipis\":{},\"shootdowns\":{},\"tlb_rounds\":{},\"tlb_stale\":{},\"smp_stress_ops\":{}",
            self.cpus,
            self.cpus_offered,
            self.timer_irqs,
            self.interrupts,
            self.context_switches,
            self.preemptions,
            self.threads,
            self.migrations,
            self.sched_steals,
            self.sched_remote_wakeups,
            self.ipis,
            self.shootdowns,
            self.tlb_rounds,
            self.tlb_stale,
            self.smp_stress_ops
        )?;
        write!(
            f,
            ",\"cpa_calls\":{},\"cpa_splits\":{},\"cpa_fast\":{},\"cpa_split_races\":{},\
             \"cpa_faults_verified\":{},\
             \"pagealloc_unmaps\":{},\"pagealloc_faults\":{},\
             \"lazy_batches\":{},\"lazy_batches_preempted\":{},\"lazy_migrations\":{},\
             \"lazy_tick_us\":{}",
            self.cpa_calls,
            self.cpa_splits,
            self.cpa_fast,
            self.cpa_split_races,
            self.cpa_faults_verified,
            self.pagealloc_unmaps,
            self.pagealloc_faults,
            self.lazy_batches,
            self.lazy_batches_preempted,
            self.lazy_migrations,
            self.lazy_tick_us
        )?;
        let [thread, irq, nested] = self.kmap_max_depth;
        write!(
            f,
            ",\"kmaps\":{},\"kmap_max_depth_thread\":{thread},\"kmap_max_depth_irq\":{irq},\
             \"kmap_max_depth_nested\":{nested},\"kmap_switch_remaps\":{},\"kmap_mismatches\":{},\
             \"kmap_lazy_joins\":{},\"highmem_frames_checked\":{}}}",
            self.kmaps,
            self.kmap_switch_remaps,
            self.kmap_mismatches,
            self.kmap_lazy_joins,
            self.highmem_frames_checked
        )
    }
}

/// Prints the report line.
pub fn print(report: &Report) {
    crate::kprintln!("PVMMU-REPORT {report}");
}
