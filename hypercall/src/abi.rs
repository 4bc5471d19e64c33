//! The Xen PV ABI structures this crate passes to Xen, with their layouts
//! pinned by compile-time assertions, plus constants `xen-sys` lacks.
//!
//! Invariant: every struct handed to Xen by pointer has exactly the size and
//! field offsets of Xen 4.17's public headers (checked below at build time).

use core::mem::{offset_of, size_of};
use static_assertions::const_assert_eq;

pub use xen_sys::{mmu_update, mmuext_op, multicall_entry, start_info};

/// Hypercall numbers used by this crate (`xen/include/public/xen.h`).
pub mod nr {
    pub use xen_sys::{
        __HYPERVISOR_console_io as CONSOLE_IO, __HYPERVISOR_event_channel_op as EVENT_CHANNEL_OP,
        __HYPERVISOR_memory_op as MEMORY_OP, __HYPERVISOR_mmu_update as MMU_UPDATE,
        __HYPERVISOR_mmuext_op as MMUEXT_OP, __HYPERVISOR_multicall as MULTICALL,
        __HYPERVISOR_sched_op as SCHED_OP, __HYPERVISOR_set_timer_op as SET_TIMER_OP,
        __HYPERVISOR_update_va_mapping as UPDATE_VA_MAPPING, __HYPERVISOR_vcpu_op as VCPU_OP,
        __HYPERVISOR_vm_assist as VM_ASSIST, __HYPERVISOR_xen_version as XEN_VERSION,
    };
}

pub use xen_sys::{
    CONSOLEIO_write, EVTCHNOP_send, SCHEDOP_shutdown, SHUTDOWN_crash, SHUTDOWN_poweroff,
    SHUTDOWN_reboot, VMASST_CMD_disable, VMASST_CMD_enable, VMASST_TYPE_writable_pagetables,
    MMUEXT_FLUSH_CACHE, MMUEXT_FLUSH_CACHE_GLOBAL, MMUEXT_INVLPG_ALL, MMUEXT_INVLPG_LOCAL,
    MMUEXT_INVLPG_MULTI, MMUEXT_NEW_BASEPTR, MMUEXT_NEW_USER_BASEPTR, MMUEXT_PIN_L1_TABLE,
    MMUEXT_PIN_L2_TABLE, MMUEXT_PIN_L3_TABLE, MMUEXT_PIN_L4_TABLE, MMUEXT_TLB_FLUSH_ALL,
    MMUEXT_TLB_FLUSH_LOCAL, MMUEXT_TLB_FLUSH_MULTI, MMUEXT_UNPIN_TABLE, MMU_MACHPHYS_UPDATE,
    MMU_NORMAL_PT_UPDATE, MMU_PT_UPDATE_PRESERVE_AD,
};

/// `update_va_mapping` flag: flush the whole local TLB afterwards.
pub const UVMF_TLB_FLUSH: u64 = 1;
/// `update_va_mapping` flag: invalidate only the updated address afterwards.
pub const UVMF_INVLPG: u64 = 2;
/// `update_va_mapping` flag: apply the flush on every vCPU, not only this one.
pub const UVMF_ALL: u64 = 4;
/// `update_va_mapping` flag value: no flush.
pub const UVMF_NONE: u64 = 0;

/// `memory_op` sub-command: the domain's pseudo-physical memory map.
pub const XENMEM_MEMORY_MAP: u32 = 9;
/// `memory_op` sub-command: the host's machine memory map (dom0 only).
pub const XENMEM_MACHINE_MEMORY_MAP: u32 = 10;
/// `memory_op` sub-command: current reservation of a domain, in pages.
pub const XENMEM_CURRENT_RESERVATION: u32 = 3;
/// `memory_op` sub-command: maximum reservation of a domain, in pages.
pub const XENMEM_MAXIMUM_RESERVATION: u32 = 4;

/// `xen_version` sub-command: major << 16 | minor.
pub const XENVER_VERSION: u32 = 0;
/// `xen_version` sub-command: extra version string (16 bytes).
pub const XENVER_EXTRAVERSION: u32 = 1;

/// `vcpu_op` sub-command: stop the periodic timer.
pub const VCPUOP_STOP_PERIODIC_TIMER: u32 = 7;

/// `DOMID_SELF`: the calling domain.
pub const DOMID_SELF: u16 = 0x7ff0;

/// `start_info.flags`: this domain is privileged (dom0).
pub const SIF_PRIVILEGED: u32 = 1 << 0;
/// `start_info.flags`: this is the initial domain (dom0).
pub const SIF_INITDOMAIN: u32 = 1 << 1;
/// The `IA32_PAT` value Xen runs PV guests with (`XEN_MSR_PAT` in Xen's
/// `asm/processor.h`, an ABI with PV guests; a PV guest's `rdmsr` of
/// `IA32_PAT` returns it): PA0 WB, PA1 WT, PA2 UC-, PA3 UC, PA4 WC, PA5 WP,
/// PA6 UC, PA7 UC. Kernels should read the MSR rather than assume it.
pub const XEN_MSR_PAT: u64 = 0x0000_0501_0007_0406;

/// `start_info.flags`: `mod_start` is a PFN, not a virtual address.
pub const SIF_MOD_START_PFN: u32 = 1 << 3;

/// One entry of the memory map returned by `XENMEM_memory_map`: Xen copies
/// its packed 20-byte `struct e820entry`.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Type: 1 = RAM, anything else is not RAM.
    pub kind: u32,
}

/// Argument of `XENMEM_memory_map` (`struct xen_memory_map`).
#[repr(C)]
#[derive(Debug)]
pub struct XenMemoryMap {
    /// In: capacity of `buffer` in entries. Out: entries written.
    pub nr_entries: u32,
    /// Guest handle of the entry buffer.
    pub buffer: *mut E820Entry,
}

/// Argument of `XENMEM_current_reservation` and friends (`domid_t`).
pub type DomId = u16;

/// Argument of `EVTCHNOP_send`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EvtchnSend {
    /// Local event-channel port to notify.
    pub port: u32,
}

/// Argument of `SCHEDOP_shutdown`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SchedShutdown {
    /// One of the `SHUTDOWN_*` reasons.
    pub reason: u32,
}

// mmu_update: { u64 ptr; u64 val; }
const_assert_eq!(size_of::<mmu_update>(), 16);
const_assert_eq!(offset_of!(mmu_update, ptr), 0);
const_assert_eq!(offset_of!(mmu_update, val), 8);
// mmuext_op: { unsigned cmd; union { mfn; linear_addr } arg1; union { nr_ents; vcpumask; src_mfn } arg2; }
const_assert_eq!(size_of::<mmuext_op>(), 24);
const_assert_eq!(offset_of!(mmuext_op, cmd), 0);
const_assert_eq!(offset_of!(mmuext_op, arg1), 8);
const_assert_eq!(offset_of!(mmuext_op, arg2), 16);
// multicall_entry: { xen_ulong_t op, result; xen_ulong_t args[6]; }
const_assert_eq!(size_of::<multicall_entry>(), 64);
const_assert_eq!(offset_of!(multicall_entry, op), 0);
const_assert_eq!(offset_of!(multicall_entry, result), 8);
const_assert_eq!(offset_of!(multicall_entry, args), 16);
// start_info (x86_64)
const_assert_eq!(size_of::<start_info>(), 1168);
const_assert_eq!(offset_of!(start_info, nr_pages), 32);
const_assert_eq!(offset_of!(start_info, shared_info), 40);
const_assert_eq!(offset_of!(start_info, flags), 48);
const_assert_eq!(offset_of!(start_info, store_mfn), 56);
const_assert_eq!(offset_of!(start_info, store_evtchn), 64);
const_assert_eq!(offset_of!(start_info, console), 72);
const_assert_eq!(offset_of!(start_info, pt_base), 88);
const_assert_eq!(offset_of!(start_info, nr_pt_frames), 96);
const_assert_eq!(offset_of!(start_info, mfn_list), 104);
const_assert_eq!(offset_of!(start_info, mod_start), 112);
const_assert_eq!(offset_of!(start_info, mod_len), 120);
const_assert_eq!(offset_of!(start_info, cmd_line), 128);
const_assert_eq!(offset_of!(start_info, first_p2m_pfn), 1152);
const_assert_eq!(offset_of!(start_info, nr_p2m_frames), 1160);
// e820 entry as Xen writes it: packed, 20 bytes.
const_assert_eq!(size_of::<E820Entry>(), 20);
const_assert_eq!(offset_of!(E820Entry, kind), 16);
const_assert_eq!(size_of::<XenMemoryMap>(), 16);
const_assert_eq!(offset_of!(XenMemoryMap, buffer), 8);
const_assert_eq!(size_of::<EvtchnSend>(), 4);
const_assert_eq!(size_of::<SchedShutdown>(), 4);

// ---- events, callbacks, time (xen.h, event_channel.h, callback.h, vcpu.h) ----

/// `__HYPERVISOR_iret` (the PV guest's return from an exception or event).
pub const HYPERVISOR_IRET: u32 = 23;
/// `__HYPERVISOR_callback_op`.
pub const HYPERVISOR_CALLBACK_OP: u32 = 30;

/// `callback_op` sub-command: register a callback.
pub const CALLBACKOP_REGISTER: u32 = 0;
/// Callback type: the event-channel upcall.
pub const CALLBACKTYPE_EVENT: u16 = 0;
/// Callback type: the failsafe callback (a segment reload on iret failed).
pub const CALLBACKTYPE_FAILSAFE: u16 = 1;
/// Callback flag: mask events (`evtchn_upcall_mask`) when entering.
pub const CALLBACKF_MASK_EVENTS: u16 = 1;

/// Argument of `CALLBACKOP_register` (`struct callback_register`, x86_64:
/// `xen_callback_t` is a plain address).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CallbackRegister {
    /// `CALLBACKTYPE_*`.
    pub kind: u16,
    /// `CALLBACKF_*`.
    pub flags: u16,
    /// Padding (the address is 8-byte aligned).
    pub pad: u32,
    /// Entry point.
    pub address: u64,
}

/// `event_channel_op` sub-command: bind a virtual IRQ to a new port.
pub const EVTCHNOP_BIND_VIRQ: u32 = 1;
/// `event_channel_op` sub-command: close a port.
pub const EVTCHNOP_CLOSE: u32 = 3;
/// `event_channel_op` sub-command: bind an inter-vCPU port.
pub const EVTCHNOP_BIND_IPI: u32 = 7;
/// `event_channel_op` sub-command: unmask a port (Xen re-raises a pending
/// event).
pub const EVTCHNOP_UNMASK: u32 = 9;
/// Virtual IRQ: the per-vCPU timer.
pub const VIRQ_TIMER: u32 = 0;
/// Virtual IRQ that does not exist (for the bind refusal test).
pub const NR_VIRQS: u32 = 24;

/// Argument of `EVTCHNOP_bind_virq`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EvtchnBindVirq {
    /// In: the virtual IRQ.
    pub virq: u32,
    /// In: the vCPU to deliver to.
    pub vcpu: u32,
    /// Out: the new local port.
    pub port: u32,
}

/// Argument of `EVTCHNOP_bind_ipi`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EvtchnBindIpi {
    /// In: the vCPU to deliver to.
    pub vcpu: u32,
    /// Out: the new local port.
    pub port: u32,
}

/// Argument of `EVTCHNOP_unmask` and `EVTCHNOP_close`: one port.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EvtchnPort {
    /// The port.
    pub port: u32,
}

/// `vcpu_op` sub-command: arm the one-shot timer.
pub const VCPUOP_SET_SINGLESHOT_TIMER: u32 = 8;
/// `vcpu_op` sub-command: disarm the one-shot timer.
pub const VCPUOP_STOP_SINGLESHOT_TIMER: u32 = 9;
/// One-shot timer flag: fail with `-ETIME` if the deadline already passed.
pub const VCPU_SSHOTTMR_FUTURE: u32 = 1;

/// Argument of `VCPUOP_set_singleshot_timer`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct VcpuSetSingleshotTimer {
    /// Absolute Xen system time of the deadline, in nanoseconds.
    pub timeout_abs_ns: u64,
    /// `VCPU_SSHOTTMR_*`.
    pub flags: u32,
    /// Padding to the C size.
    pub pad: u32,
}

/// `sched_op` sub-command: block until an event is pending (events are
/// unmasked atomically with the block).
pub const SCHEDOP_BLOCK: u32 = 1;

/// Per-vCPU time information (`struct vcpu_time_info`). Xen system time
/// is `system_time` plus the TSC delta since `tsc_timestamp`, shifted by
/// `tsc_shift` (right if negative), times `tsc_to_system_mul` in 32.32 fixed
/// point; valid while `version` is even and unchanged across the read.
#[repr(C)]
#[derive(Debug)]
pub struct VcpuTimeInfo {
    /// Odd while Xen updates the record.
    pub version: u32,
    /// Padding.
    pub pad0: u32,
    /// TSC at the last update.
    pub tsc_timestamp: u64,
    /// System time (ns since Xen booted) at the last update.
    pub system_time: u64,
    /// TSC-to-ns multiplier (32.32 fixed point).
    pub tsc_to_system_mul: u32,
    /// Shift applied to the TSC delta first.
    pub tsc_shift: i8,
    /// `XEN_PVCLOCK_*` flags.
    pub flags: u8,
    /// Padding.
    pub pad1: [u8; 2],
}

/// One vCPU's slot in the shared-info page (`struct vcpu_info`, x86_64).
#[repr(C)]
#[derive(Debug)]
pub struct VcpuInfo {
    /// Set by Xen when an event is pending for this vCPU.
    pub evtchn_upcall_pending: u8,
    /// Non-zero: Xen does not deliver the event upcall (the PV "cli").
    pub evtchn_upcall_mask: u8,
    /// Padding.
    pub pad0: [u8; 6],
    /// One bit per word of `evtchn_pending` that has a pending port.
    pub evtchn_pending_sel: u64,
    /// `arch_vcpu_info`: cr2 and padding.
    pub arch: [u64; 2],
    /// The vCPU's clock.
    pub time: VcpuTimeInfo,
}

/// vCPU slots in the shared-info page (`XEN_LEGACY_MAX_VCPUS`).
pub const LEGACY_MAX_VCPUS: usize = 32;

/// The shared-info page, as far as the kernel reads it.
#[repr(C)]
#[derive(Debug)]
pub struct SharedInfo {
    /// Per-vCPU state.
    pub vcpu_info: [VcpuInfo; LEGACY_MAX_VCPUS],
    /// 2-level event channels: one pending bit per port.
    pub evtchn_pending: [u64; 64],
    /// 2-level event channels: one mask bit per port.
    pub evtchn_mask: [u64; 64],
}

const_assert_eq!(size_of::<CallbackRegister>(), 16);
const_assert_eq!(offset_of!(CallbackRegister, address), 8);
const_assert_eq!(size_of::<EvtchnBindVirq>(), 12);
const_assert_eq!(size_of::<EvtchnBindIpi>(), 8);
const_assert_eq!(size_of::<VcpuSetSingleshotTimer>(), 16);
const_assert_eq!(size_of::<VcpuTimeInfo>(), 32);
const_assert_eq!(offset_of!(VcpuTimeInfo, tsc_timestamp), 8);
const_assert_eq!(offset_of!(VcpuTimeInfo, system_time), 16);
const_assert_eq!(offset_of!(VcpuTimeInfo, tsc_to_system_mul), 24);
const_assert_eq!(offset_of!(VcpuTimeInfo, tsc_shift), 28);
const_assert_eq!(size_of::<VcpuInfo>(), 64);
const_assert_eq!(offset_of!(VcpuInfo, evtchn_upcall_mask), 1);
const_assert_eq!(offset_of!(VcpuInfo, evtchn_pending_sel), 8);
const_assert_eq!(offset_of!(VcpuInfo, time), 32);
const_assert_eq!(offset_of!(SharedInfo, evtchn_pending), 2048);
const_assert_eq!(offset_of!(SharedInfo, evtchn_mask), 2560);
