//! The PVH boot protocol's `hvm_start_info` (xen/include/public/arch-x86/
//! hvm/start_info.h), read once at entry.
//!
//! Invariant: the structure, its memory map, command line and module list
//! are read only through the trampoline's identity map of the low 4 GiB and
//! only while parsing; everything kept is copied into [`PvhBoot`], so the
//! loader's memory may be reused afterwards. Pointers above 4 GiB (not in
//! the identity map) are refused.

use crate::cmdline::{Cmdline, CMDLINE_MAX};
use crate::memmap::{MapSource, MemoryMap, RegionKind};

/// `hvm_start_info.magic`.
pub const HVM_START_MAGIC: u32 = 0x336e_c578;
/// The trampoline identity-maps physical memory below this address.
pub const IDENTITY_LIMIT: u64 = 4 << 30;
/// Most modules remembered.
pub const MAX_MODULES: usize = 8;

/// `struct hvm_start_info` (version 1).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

/// `struct hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct HvmMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

/// `struct hvm_modlist_entry`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct HvmModlistEntry {
    paddr: u64,
    size: u64,
    cmdline_paddr: u64,
    reserved: u64,
}

const _: () = assert!(core::mem::size_of::<HvmStartInfo>() == 56);
const _: () = assert!(core::mem::offset_of!(HvmStartInfo, memmap_paddr) == 40);
const _: () = assert!(core::mem::size_of::<HvmMemmapEntry>() == 24);
const _: () = assert!(core::mem::size_of::<HvmModlistEntry>() == 32);

/// Why `hvm_start_info` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PvhError {
    /// Null or above the identity map, or not 8-byte aligned.
    BadPointer(u64),
    /// Wrong magic number.
    BadMagic(u32),
    /// Version 0 has no memory map; we need version >= 1.
    NoMemoryMap(u32),
}

/// A boot module `[start, end)` (physical bytes), e.g. an initrd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Module {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// What the kernel keeps from `hvm_start_info`.
#[derive(Clone)]
pub struct PvhBoot {
    /// Physical address of `hvm_start_info`.
    pub start_info_paddr: u64,
    /// Protocol version.
    pub version: u32,
    /// The e820 map.
    pub memmap: MemoryMap,
    /// The command line.
    pub cmdline: Cmdline,
    /// Physical address of the ACPI RSDP (0 if none).
    pub rsdp_paddr: u64,
    /// Modules.
    pub modules: [Module; MAX_MODULES],
    /// Number of valid entries in `modules`.
    pub nr_modules: usize,
}

fn check_ptr(paddr: u64, len: u64, align: u64) -> Result<(), PvhError> {
    let end = paddr.checked_add(len).ok_or(PvhError::BadPointer(paddr))?;
    if paddr == 0 || end > IDENTITY_LIMIT || !paddr.is_multiple_of(align) {
        return Err(PvhError::BadPointer(paddr));
    }
    Ok(())
}

/// Reads `T` at identity-mapped physical address `paddr` (checked).
fn read_phys<T: Copy>(paddr: u64) -> Result<T, PvhError> {
    check_ptr(paddr, core::mem::size_of::<T>() as u64, 1)?;
    // SAFETY: the trampoline identity-maps [0, 4 GiB) and `check_ptr`
    // keeps the read inside it; the loader placed a `T` there.
    Ok(unsafe { core::ptr::read_unaligned(paddr as *const T) })
}

/// Parses the `hvm_start_info` at physical `paddr`.
pub fn parse(paddr: u64) -> Result<PvhBoot, PvhError> {
    check_ptr(paddr, core::mem::size_of::<HvmStartInfo>() as u64, 8)?;
    let si: HvmStartInfo = read_phys(paddr)?;
    if si.magic != HVM_START_MAGIC {
        return Err(PvhError::BadMagic(si.magic));
    }
    if si.version < 1 {
        return Err(PvhError::NoMemoryMap(si.version));
    }
    let mut memmap = MemoryMap::new(MapSource::HvmStartInfo);
    for i in 0..u64::from(si.memmap_entries) {
        let e: HvmMemmapEntry = read_phys(si.memmap_paddr + i * 24)?;
        memmap.push(e.addr, e.size, RegionKind::from_e820(e.kind));
    }
    let cmdline = if si.cmdline_paddr == 0 {
        Cmdline::empty()
    } else {
        let len = (CMDLINE_MAX as u64).min(IDENTITY_LIMIT.saturating_sub(si.cmdline_paddr));
        check_ptr(si.cmdline_paddr, len, 1)?;
        // SAFETY: [cmdline_paddr, +len) is inside the identity map (checked);
        // the loader put a NUL-terminated string there and we stop at NUL.
        let bytes =
            unsafe { core::slice::from_raw_parts(si.cmdline_paddr as *const u8, len as usize) };
        Cmdline::from_nul_terminated(bytes)
    };
    let mut modules = [Module::default(); MAX_MODULES];
    let nr_modules = (si.nr_modules as usize).min(MAX_MODULES);
    for (i, slot) in modules.iter_mut().enumerate().take(nr_modules) {
        let m: HvmModlistEntry = read_phys(si.modlist_paddr + i as u64 * 32)?;
        *slot = Module {
            start: m.paddr,
            end: m.paddr.saturating_add(m.size),
        };
    }
    Ok(PvhBoot {
        start_info_paddr: paddr,
        version: si.version,
        memmap,
        cmdline,
        rsdp_paddr: si.rsdp_paddr,
        modules,
        nr_modules,
    })
}
