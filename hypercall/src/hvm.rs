//! The Xen interface of an HVM or PVH guest: finding Xen's CPUID leaves,
//! installing the hypercall page through the MSR they name, and the HVM
//! parameters that locate the PV console.
//!
//! A PVH guest runs in ring 0 of a hardware virtual machine: it cannot use
//! the PV `syscall` path. Xen writes one 32-byte stub per hypercall
//! (`mov $nr, %eax; vmcall` or `vmmcall`; `ret`) into a guest page when the
//! guest writes that page's physical address to the MSR whose index CPUID
//! leaf `base + 2` gives; [`crate::raw`] then calls through that page.
//!
//! The decoding (which leaf, which MSR, which console frame and port) is
//! pure and tested on the host; only [`install_hypercall_page`],
//! [`get_param`] and [`features`] touch the CPU or Xen.
//!
//! Invariant: nothing here issues a hypercall before
//! [`install_hypercall_page`] has pointed [`crate::raw`] at a page Xen
//! filled; every value Xen or the CPU returns is checked before use.

use core::mem::{offset_of, size_of};
use static_assertions::const_assert_eq;

use crate::raw::call2;
use crate::XenError;

/// Xen's CPUID vendor signature (ebx, ecx, edx of its base leaf).
pub const XEN_SIGNATURE: [u8; 12] = *b"XenVMMXenVMM";
/// First leaf where a hypervisor's CPUID range may start.
pub const CPUID_BASE_FIRST: u32 = 0x4000_0000;
/// End of the search: Xen may move its range up in steps of
/// [`CPUID_BASE_STEP`] (when it also offers Viridian leaves at the start).
pub const CPUID_BASE_END: u32 = 0x4001_0000;
/// Distance between candidate base leaves.
pub const CPUID_BASE_STEP: u32 = 0x100;
/// Offset from the base of the leaf naming the hypercall-page MSR.
pub const CPUID_HYPERCALL_LEAF: u32 = 2;
/// Offset from the base of the time leaf (subleaf 0: ecx = the guest's TSC
/// frequency in kHz; `public/arch-x86/cpuid.h`).
pub const CPUID_TIME_LEAF: u32 = 3;

/// `hvm_op` hypercall number (`__HYPERVISOR_hvm_op`).
pub const HVM_OP: u32 = xen_sys::__HYPERVISOR_hvm_op;
/// `hvm_op` sub-command: read an HVM parameter (`public/hvm/hvm_op.h`).
pub const HVMOP_GET_PARAM: u32 = 1;
/// HVM parameter: frame of the PV console ring (`public/hvm/params.h`).
pub const HVM_PARAM_CONSOLE_PFN: u32 = 17;
/// HVM parameter: event channel of the PV console.
pub const HVM_PARAM_CONSOLE_EVTCHN: u32 = 18;
/// `xen_version` sub-command: one 32-bit submap of feature flags.
pub const XENVER_GET_FEATURES: u32 = 6;
/// Feature flag: this domain is the hardware domain (dom0).
pub const XENFEAT_DOM0: u32 = 11;

/// One CPUID result: `[eax, ebx, ecx, edx]`.
pub type CpuidRegs = [u32; 4];

/// Why the HVM interface could not be set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HvmError {
    /// No base leaf in `0x40000000..0x40010000` has Xen's signature with at
    /// least the hypercall leaf behind it.
    NoXenLeaves,
    /// Xen offers no hypercall page (leaf `base + 2` says 0 pages).
    NoHypercallPages,
    /// The MSR index is 0 (not an MSR Xen would intercept).
    NoHypercallMsr,
    /// The hypercall page address is not page-aligned.
    MisalignedPage(u64),
    /// A hypercall failed.
    Xen(XenError),
    /// `HVM_PARAM_CONSOLE_PFN` is 0: the toolstack set up no PV console.
    NoConsole,
    /// The console frame lies beyond any physical address.
    BadConsolePfn(u64),
    /// The console event channel is 0 or does not fit a port number.
    BadConsoleEvtchn(u64),
}

impl From<XenError> for HvmError {
    fn from(e: XenError) -> Self {
        HvmError::Xen(e)
    }
}

/// Where Xen's CPUID leaves are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XenLeaves {
    /// The base leaf (with the signature).
    pub base: u32,
    /// The largest leaf Xen answers (eax of the base leaf).
    pub max_leaf: u32,
}

/// The signature bytes of one CPUID result (ebx, ecx, edx).
pub fn signature(regs: CpuidRegs) -> [u8; 12] {
    let mut bytes = [0u8; 12];
    bytes[0..4].copy_from_slice(&regs[1].to_le_bytes());
    bytes[4..8].copy_from_slice(&regs[2].to_le_bytes());
    bytes[8..12].copy_from_slice(&regs[3].to_le_bytes());
    bytes
}

/// Scans the candidate base leaves for Xen's signature with the hypercall
/// leaf inside its range. `cpuid(leaf)` returns the CPU's answer (subleaf 0).
pub fn find_xen_leaves(mut cpuid: impl FnMut(u32) -> CpuidRegs) -> Option<XenLeaves> {
    (CPUID_BASE_FIRST..CPUID_BASE_END)
        .step_by(CPUID_BASE_STEP as usize)
        .find_map(|base| {
            let regs = cpuid(base);
            let max_leaf = regs[0];
            let in_range = max_leaf
                .checked_sub(base)
                .is_some_and(|n| (CPUID_HYPERCALL_LEAF..CPUID_BASE_STEP).contains(&n));
            (signature(regs) == XEN_SIGNATURE && in_range).then_some(XenLeaves { base, max_leaf })
        })
}

/// What leaf `base + 2` says about the hypercall page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HypercallPageMsr {
    /// Pages of hypercall stubs Xen offers (eax); we use the first.
    pub pages: u32,
    /// The MSR to write the page's physical address to (ebx).
    pub msr: u32,
}

impl HypercallPageMsr {
    /// Decodes leaf `leaves.base + 2`.
    pub fn from_cpuid(
        leaves: XenLeaves,
        mut cpuid: impl FnMut(u32) -> CpuidRegs,
    ) -> Result<Self, HvmError> {
        let regs = cpuid(leaves.base + CPUID_HYPERCALL_LEAF);
        let (pages, msr) = (regs[0], regs[1]);
        if pages == 0 {
            return Err(HvmError::NoHypercallPages);
        }
        if msr == 0 {
            return Err(HvmError::NoHypercallMsr);
        }
        Ok(HypercallPageMsr { pages, msr })
    }

    /// The MSR value that installs hypercall page 0 at physical `paddr`:
    /// the page address with the page index (0) in the low 12 bits.
    pub fn value(&self, paddr: u64) -> Result<u64, HvmError> {
        if paddr & 0xfff != 0 {
            return Err(HvmError::MisalignedPage(paddr));
        }
        Ok(paddr)
    }
}

/// The guest's TSC frequency in Hz from Xen's time leaf (`base + 3`,
/// subleaf 0, ecx in kHz), if Xen has that leaf and states a frequency.
/// `cpuid(leaf)` must answer subleaf 0.
pub fn tsc_hz(leaves: XenLeaves, mut cpuid: impl FnMut(u32) -> CpuidRegs) -> Option<u64> {
    let leaf = leaves.base + CPUID_TIME_LEAF;
    if leaves.max_leaf < leaf {
        return None;
    }
    match cpuid(leaf)[2] {
        0 => None,
        khz => Some(u64::from(khz) * 1000),
    }
}

/// Highest frame number an x86-64 physical address (52 bits) can name.
pub const MAX_PFN: u64 = (1 << 40) - 1;

/// The PV console of an HVM/PVH domain, from its HVM parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleRing {
    /// Guest frame of the ring page (`struct xencons_interface`).
    pub pfn: u64,
    /// Event channel that notifies the console backend.
    pub evtchn: u32,
}

impl ConsoleRing {
    /// Checks the raw values of `HVM_PARAM_CONSOLE_PFN` and
    /// `HVM_PARAM_CONSOLE_EVTCHN`. Port 0 is never a bound event channel,
    /// and frame 0 means "no console".
    pub fn from_params(pfn: u64, evtchn: u64) -> Result<Self, HvmError> {
        if pfn == 0 {
            return Err(HvmError::NoConsole);
        }
        if pfn > MAX_PFN {
            return Err(HvmError::BadConsolePfn(pfn));
        }
        let port = u32::try_from(evtchn).map_err(|_| HvmError::BadConsoleEvtchn(evtchn))?;
        if port == 0 {
            return Err(HvmError::BadConsoleEvtchn(evtchn));
        }
        Ok(ConsoleRing { pfn, evtchn: port })
    }

    /// Physical address of the ring page.
    pub const fn paddr(&self) -> u64 {
        self.pfn << 12
    }
}

/// Argument of `HVMOP_get_param` (`struct xen_hvm_param`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct XenHvmParam {
    /// Domain (`DOMID_SELF`).
    pub domid: u16,
    /// Padding (the C layout's).
    pub pad: u16,
    /// Parameter index.
    pub index: u32,
    /// Out: the value.
    pub value: u64,
}

/// Argument of `XENVER_get_features` (`struct xen_feature_info`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct XenFeatureInfo {
    /// In: which 32-flag submap.
    pub submap_idx: u32,
    /// Out: the flags.
    pub submap: u32,
}

const_assert_eq!(size_of::<XenHvmParam>(), 16);
const_assert_eq!(offset_of!(XenHvmParam, index), 4);
const_assert_eq!(offset_of!(XenHvmParam, value), 8);
const_assert_eq!(size_of::<XenFeatureInfo>(), 8);

/// Writes the hypercall page's physical address to Xen's MSR, then makes
/// every hypercall of this crate call through the page at `page_va`.
///
/// # Safety
/// We run in ring 0 of a Xen HVM/PVH guest whose CPUID leaves gave `msr`;
/// `page_va` maps physical `page_paddr` executable for as long as
/// hypercalls are issued, and nothing else uses that page (Xen overwrites
/// it with its stubs).
pub unsafe fn install_hypercall_page(
    msr: HypercallPageMsr,
    page_va: u64,
    page_paddr: u64,
) -> Result<(), HvmError> {
    let value = msr.value(page_paddr)?;
    // SAFETY: the caller guarantees Xen intercepts this MSR (it named it
    // in its CPUID leaf) and that the page is ours to have overwritten.
    unsafe {
        core::arch::asm!(
            "wrmsr",
            in("ecx") msr.msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack, preserves_flags),
        );
        crate::raw::use_hypercall_page(page_va);
    }
    Ok(())
}

/// `hvm_op(HVMOP_get_param, DOMID_SELF, index)`: one HVM parameter.
///
/// # Safety
/// Only as a Xen guest with a hypercall path (see [`crate::raw`]).
pub unsafe fn get_param(index: u32) -> Result<u64, XenError> {
    let mut arg = XenHvmParam {
        domid: crate::abi::DOMID_SELF,
        index,
        ..XenHvmParam::default()
    };
    // SAFETY: `arg` lives across the call and Xen writes only inside it.
    let ret = unsafe {
        call2(
            HVM_OP,
            u64::from(HVMOP_GET_PARAM),
            &mut arg as *mut _ as u64,
        )
    };
    XenError::check(ret).map(|_| arg.value)
}

/// `xen_version(XENVER_get_features)`: feature submap `submap_idx`.
///
/// # Safety
/// Only as a Xen guest with a hypercall path (see [`crate::raw`]).
pub unsafe fn features(submap_idx: u32) -> Result<u32, XenError> {
    let mut arg = XenFeatureInfo {
        submap_idx,
        submap: 0,
    };
    // SAFETY: `arg` lives across the call and Xen writes only inside it.
    let ret = unsafe {
        call2(
            crate::abi::nr::XEN_VERSION,
            u64::from(XENVER_GET_FEATURES),
            &mut arg as *mut _ as u64,
        )
    };
    XenError::check(ret).map(|_| arg.submap)
}

/// Reads the console's HVM parameters and checks them.
///
/// # Safety
/// As for [`get_param`].
pub unsafe fn console_ring() -> Result<ConsoleRing, HvmError> {
    // SAFETY: forwarded contract.
    let pfn = unsafe { get_param(HVM_PARAM_CONSOLE_PFN) }?;
    // SAFETY: forwarded contract.
    let evtchn = unsafe { get_param(HVM_PARAM_CONSOLE_EVTCHN) }?;
    ConsoleRing::from_params(pfn, evtchn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPUID answering `leaves` (leaf, regs) and zero elsewhere.
    fn cpu(leaves: &[(u32, CpuidRegs)]) -> impl FnMut(u32) -> CpuidRegs + '_ {
        move |leaf| {
            leaves
                .iter()
                .find(|(l, _)| *l == leaf)
                .map_or([0; 4], |(_, r)| *r)
        }
    }

    fn sig_regs(max_leaf: u32, sig: &[u8; 12]) -> CpuidRegs {
        let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
        [max_leaf, word(0), word(4), word(8)]
    }

    #[test]
    fn xen_leaves_at_the_first_base() {
        let leaves = [(0x4000_0000, sig_regs(0x4000_0005, &XEN_SIGNATURE))];
        assert_eq!(
            find_xen_leaves(cpu(&leaves)),
            Some(XenLeaves {
                base: 0x4000_0000,
                max_leaf: 0x4000_0005
            })
        );
    }

    #[test]
    fn xen_leaves_moved_up_behind_viridian() {
        // Viridian first (as with viridian=1), Xen at 0x40000100.
        let leaves = [
            (0x4000_0000, sig_regs(0x4000_0006, b"Microsoft Hv")),
            (0x4000_0100, sig_regs(0x4000_0105, &XEN_SIGNATURE)),
        ];
        assert_eq!(
            find_xen_leaves(cpu(&leaves)).map(|l| l.base),
            Some(0x4000_0100)
        );
        // The last candidate base is still searched, the one past it not.
        let last = [(0x4000_ff00, sig_regs(0x4000_ff02, &XEN_SIGNATURE))];
        assert_eq!(
            find_xen_leaves(cpu(&last)).map(|l| l.base),
            Some(0x4000_ff00)
        );
        let past = [(0x4001_0000, sig_regs(0x4001_0002, &XEN_SIGNATURE))];
        assert_eq!(find_xen_leaves(cpu(&past)), None);
    }

    #[test]
    fn xen_leaves_need_signature_and_hypercall_leaf() {
        assert_eq!(find_xen_leaves(cpu(&[])), None);
        let kvm = [(0x4000_0000, sig_regs(0x4000_0001, b"KVMKVMKVM\0\0\0"))];
        assert_eq!(find_xen_leaves(cpu(&kvm)), None);
        // Signature, but the range stops before base + 2.
        let short = [(0x4000_0000, sig_regs(0x4000_0001, &XEN_SIGNATURE))];
        assert_eq!(find_xen_leaves(cpu(&short)), None);
        // A max leaf below the base (garbage) or past the next base.
        let below = [(0x4000_0100, sig_regs(0x4000_0000, &XEN_SIGNATURE))];
        assert_eq!(find_xen_leaves(cpu(&below)), None);
        let beyond = [(0x4000_0000, sig_regs(0x4000_0100, &XEN_SIGNATURE))];
        assert_eq!(find_xen_leaves(cpu(&beyond)), None);
    }

    #[test]
    fn hypercall_msr_from_leaf_base_plus_2() {
        let base = XenLeaves {
            base: 0x4000_0100,
            max_leaf: 0x4000_0105,
        };
        let leaves = [
            (0x4000_0002, [9, 0xdead, 0, 0]),
            (0x4000_0102, [1, 0x4000_0000, 0, 0]),
        ];
        let msr = HypercallPageMsr::from_cpuid(base, cpu(&leaves)).unwrap();
        assert_eq!(
            msr,
            HypercallPageMsr {
                pages: 1,
                msr: 0x4000_0000
            }
        );
        assert_eq!(msr.value(0x0023_4000), Ok(0x0023_4000));
        assert_eq!(
            msr.value(0x0023_4010),
            Err(HvmError::MisalignedPage(0x0023_4010))
        );
        let none = [(0x4000_0102, [0, 0x4000_0000, 0, 0])];
        assert_eq!(
            HypercallPageMsr::from_cpuid(base, cpu(&none)),
            Err(HvmError::NoHypercallPages)
        );
        let no_msr = [(0x4000_0102, [1, 0, 0, 0])];
        assert_eq!(
            HypercallPageMsr::from_cpuid(base, cpu(&no_msr)),
            Err(HvmError::NoHypercallMsr)
        );
    }

    #[test]
    fn tsc_frequency_from_the_time_leaf() {
        let leaves = XenLeaves {
            base: 0x4000_0100,
            max_leaf: 0x4000_0105,
        };
        let time = [(0x4000_0103, [0, 0, 2_596_149, 0])];
        assert_eq!(tsc_hz(leaves, cpu(&time)), Some(2_596_149_000));
        // Leaf 0x40000003 belongs to the Viridian range here: not read.
        let wrong_base = [(0x4000_0003, [0, 0, 1_000, 0])];
        assert_eq!(tsc_hz(leaves, cpu(&wrong_base)), None);
        // No frequency stated, or the leaf beyond Xen's range.
        assert_eq!(tsc_hz(leaves, cpu(&[(0x4000_0103, [1, 0, 0, 0])])), None);
        let short = XenLeaves {
            base: 0x4000_0100,
            max_leaf: 0x4000_0102,
        };
        assert_eq!(tsc_hz(short, cpu(&time)), None);
    }

    #[test]
    fn console_params_are_checked() {
        assert_eq!(
            ConsoleRing::from_params(0xfeffc, 2),
            Ok(ConsoleRing {
                pfn: 0xfeffc,
                evtchn: 2
            })
        );
        assert_eq!(
            ConsoleRing::from_params(0xfeffc, 2).unwrap().paddr(),
            0xfeff_c000
        );
        assert_eq!(ConsoleRing::from_params(0, 2), Err(HvmError::NoConsole));
        assert_eq!(
            ConsoleRing::from_params(MAX_PFN + 1, 2),
            Err(HvmError::BadConsolePfn(MAX_PFN + 1))
        );
        assert_eq!(
            ConsoleRing::from_params(MAX_PFN, 1).map(|c| c.pfn),
            Ok(MAX_PFN)
        );
        assert_eq!(
            ConsoleRing::from_params(0xfeffc, 0),
            Err(HvmError::BadConsoleEvtchn(0))
        );
        assert_eq!(
            ConsoleRing::from_params(0xfeffc, 1 << 32),
            Err(HvmError::BadConsoleEvtchn(1 << 32))
        );
    }
}
