//! Bringing up the other CPUs.
//!
//! Under Xen PV every vCPU Xen offers (probed with `VCPUOP_is_up`, which
//! fails with `ENOENT` past the last) gets a full `vcpu_guest_context`:
//! kernel-mode flat selectors, its idle thread's stack (mapped through
//! pvmmu with a guard page), the trap table, the event and failsafe
//! callbacks, its GS base (its `PerCpu`), `ctrlreg[3]` = the live, pinned
//! root, and a GDT of one frame that is read-only in every mapping, as Xen
//! requires of a descriptor table. `VCPUOP_initialise` then `VCPUOP_up`;
//! the vCPU binds its own timer VIRQ and IPI port and enters its idle loop.
//!
//! Natively the CPUs are found in the ACPI MADT and started with
//! INIT-SIPI-SIPI through a real-mode trampoline below 1 MiB (see
//! [`crate::trampoline`]).
//!
//! Invariant: a CPU counts as up only once it has marked itself online
//! from its own idle thread; one that does not within [`UP_TIMEOUT_NS`] is
//! reported with its id and never waited for again.

use core::arch::global_asm;
use core::sync::atomic::Ordering;

use hypercall::ops::{VcpuGuestContext, VGCF_FAILSAFE_DISABLES_EVENTS, VGCF_IN_KERNEL};
use hypercall::XenError;

use crate::kspace::KspaceError;
use crate::percpu::{self, MAX_CPUS};
use crate::sched::{self, SchedError};
use crate::{clock, events, irq, timer, Kernel};

/// How long a CPU may take to come up.
pub const UP_TIMEOUT_NS: u64 = 2_000_000_000;

/// Why a CPU did not come up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmpError {
    /// Its idle thread or stack.
    Sched(SchedError),
    /// Its GDT frame.
    Gdt(KspaceError),
    /// Xen refused `VCPUOP_initialise` or `VCPUOP_up`.
    Xen(XenError),
    /// It did not mark itself online in time.
    Timeout,
    /// No live root to give it.
    NoRoot,
}

/// What bring-up found and did.
#[derive(Debug, Clone, Copy, Default)]
pub struct SmpReport {
    /// CPUs the platform offers (vCPUs, or enabled MADT entries).
    pub offered: usize,
    /// CPUs online (the boot CPU included).
    pub online: usize,
    /// The first CPU that failed, and why.
    pub failed: Option<(usize, SmpError)>,
}

global_asm!(
    r#"
    .pushsection .text.smp, "ax", @progbits
    .globl smp_ap_entry_pv
smp_ap_entry_pv:
    # Xen starts the vCPU with rsp = the idle thread's stack top and
    # rdi = its CPU number (both from the context we gave it).
    and $-16, %rsp
    call smp_ap_main
    ud2
    .popsection
"#,
    options(att_syntax)
);

extern "C" {
    fn smp_ap_entry_pv();
}

/// Brings up every other CPU the platform offers.
pub fn start_aps(kernel: &Kernel) -> SmpReport {
    match kernel.pv.as_ref() {
        Some(_) => start_pv(kernel),
        None => crate::trampoline::start_native(kernel),
    }
}

fn start_pv(kernel: &Kernel) -> SmpReport {
    let mut report = SmpReport {
        offered: 1,
        online: 1,
        failed: None,
    };
    for cpu in 1..MAX_CPUS {
        // SAFETY: PV.
        match unsafe { hypercall::ops::vcpu_is_up(cpu as u32) } {
            Err(_) => break,
            Ok(true) => continue,
            Ok(false) => {}
        }
        report.offered += 1;
        match bring_up_pv(kernel, cpu) {
            Ok(()) => report.online += 1,
            Err(e) => {
                log::error!("cpu {cpu} did not come up: {e:?}");
                report.failed.get_or_insert((cpu, e));
            }
        }
    }
    report
}

fn bring_up_pv(kernel: &Kernel, cpu: usize) -> Result<(), SmpError> {
    let pv = kernel.pv.as_ref().ok_or(SmpError::NoRoot)?;
    let root = kernel.direct_map.as_ref().ok_or(SmpError::NoRoot)?.root;
    let root_mfn = pv.pfn_to_mfn(root.0).ok_or(SmpError::NoRoot)?;
    let (_idle, stack) = sched::spawn_idle_for(cpu).map_err(SmpError::Sched)?;
    let (_gdt_pfn, gdt_mfn) = crate::kspace::alloc_readonly_frame().map_err(SmpError::Gdt)?;
    percpu::prepare(cpu);

    // SAFETY: the context is plain data; all-zero is a valid start.
    let mut ctxt: VcpuGuestContext = unsafe { core::mem::zeroed() };
    ctxt.flags = VGCF_IN_KERNEL | VGCF_FAILSAFE_DISABLES_EVENTS;
    let regs = &mut ctxt.user_regs;
    regs.__bindgen_anon_8.rip = smp_ap_entry_pv as *const () as u64;
    regs.__bindgen_anon_10.rsp = stack.top;
    regs.__bindgen_anon_7.rdi = cpu as u64;
    regs.cs = hypercall::ops::FLAT_KERNEL_CS64;
    regs.ss = FLAT_KERNEL_SS64;
    regs.__bindgen_anon_9.rflags = 0x200;
    for (slot, entry) in ctxt.trap_ctxt.iter_mut().zip(crate::traps::pv_trap_table()) {
        *slot = entry;
    }
    ctxt.gdt_frames[0] = gdt_mfn.0;
    ctxt.gdt_ents = 512;
    ctxt.kernel_ss = u64::from(FLAT_KERNEL_SS64);
    ctxt.kernel_sp = stack.top;
    ctxt.ctrlreg[3] = root_mfn << 12;
    ctxt.event_callback_eip = crate::events::upcall_entry();
    ctxt.failsafe_callback_eip = crate::events::failsafe_entry();
    ctxt.gs_base_kernel = percpu::base_of(cpu);
    // In the kernel space's mask before Xen loads the root for it.
    crate::kspace::ACTIVE.activate(cpu);
    // SAFETY: PV; the context names a mapped stack, the pinned live root,
    // our handlers, and a GDT frame that is read-only everywhere.
    unsafe { hypercall::ops::vcpu_initialise(cpu as u32, &ctxt) }.map_err(SmpError::Xen)?;
    // SAFETY: PV; initialised just above.
    unsafe { hypercall::ops::vcpu_up(cpu as u32) }.map_err(SmpError::Xen)?;
    wait_online(cpu)
}

/// `FLAT_KERNEL_SS64` (the flat ring-3 stack selector Xen provides).
const FLAT_KERNEL_SS64: u16 = 0xe02b;

/// Waits (sleeping) until `cpu` marks itself online.
pub fn wait_online(cpu: usize) -> Result<(), SmpError> {
    let end = clock::now_ns() + UP_TIMEOUT_NS;
    while !percpu::CPUS[cpu].online.load(Ordering::Acquire) {
        if clock::now_ns() > end {
            return Err(SmpError::Timeout);
        }
        sched::sleep_ns(1_000_000);
    }
    Ok(())
}

/// First Rust code of an application processor (interrupts off, on its
/// idle thread's stack, GS base set).
#[no_mangle]
pub extern "C" fn smp_ap_main(cpu: u64) -> ! {
    let cpu = cpu as usize;
    if percpu::cpu_id() != cpu {
        panic!(
            "cpu {cpu} started with the GS base of cpu {}",
            percpu::cpu_id()
        );
    }
    let idle = sched::ThreadId(percpu::CPUS[cpu].idle.load(Ordering::Acquire));
    sched::adopt_idle(cpu, idle);
    if crate::platform::is_xen_pv() {
        if let Err(e) = events::init_ap(cpu) {
            panic!("cpu {cpu}: events: {e:?}");
        }
        if let Err(e) = timer::start_pv_cpu(cpu) {
            panic!("cpu {cpu}: timer: {e:?}");
        }
    } else if let Err(e) = timer::start_native_cpu() {
        panic!("cpu {cpu}: timer: {e:?}");
    }
    percpu::CPUS[cpu].online.store(true, Ordering::SeqCst);
    if !crate::platform::is_xen_pv() {
        // Shootdowns target online CPUs only: one that read us offline
        // changed its tables before our store, so this flush, after it,
        // drops anything we cached before we could answer IPIs.
        x86_64::instructions::tlb::flush_all();
    }
    irq::enable();
    sched::idle_loop(cpu as u64);
    unreachable!("the idle loop returned");
}
