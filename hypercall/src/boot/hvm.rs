//! The PVH boot protocol's `hvm_start_info` (xen/include/public/arch-x86/
//! hvm/start_info.h), its memory map, command line and module list, read
//! through a [`BootMemory`] and checked before use.
//!
//! Invariant: every read goes through [`BootMemory::read`] for a range the
//! parser first checked to be non-null, overflow-free and below
//! [`BootMemory::limit`]; what is kept is copied into [`HvmBoot`]. Every
//! module is kept (up to [`MAX_MODULES`]; more is an error, never a silent
//! cut), so the kernel can reserve all of them.

use core::fmt;
use core::mem::size_of;

use crate::boot::cmdline::{Cmdline, CMDLINE_MAX};
use crate::boot::memmap::{MapSource, MemmapError, MemoryMap};

/// `hvm_start_info.magic`.
pub const HVM_START_MAGIC: u32 = 0x336e_c578;
/// Most modules kept.
pub const MAX_MODULES: usize = 32;
/// Most memory-map entries read (before empty ones are dropped and the rest
/// merged into at most `memmap::MAX_REGIONS` regions).
pub const MAX_MEMMAP_ENTRIES: u32 = 1024;

/// Physical memory the loader's structures are read from.
pub trait BootMemory {
    /// One past the highest readable physical address.
    fn limit(&self) -> u64;
    /// Copies `out.len()` bytes at `paddr`. The caller guarantees
    /// `0 < paddr` and `paddr + out.len() <= self.limit()`.
    fn read(&self, paddr: u64, out: &mut [u8]);
}

/// `struct hvm_start_info` (version 1).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
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
#[derive(Debug, Clone, Copy, Default)]
struct HvmMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

/// `struct hvm_modlist_entry`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct HvmModlistEntry {
    paddr: u64,
    size: u64,
    cmdline_paddr: u64,
    reserved: u64,
}

const _: () = assert!(size_of::<HvmStartInfo>() == 56);
const _: () = assert!(core::mem::offset_of!(HvmStartInfo, memmap_paddr) == 40);
const _: () = assert!(size_of::<HvmMemmapEntry>() == 24);
const _: () = assert!(size_of::<HvmModlistEntry>() == 32);

/// Which structure a bad pointer was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pointee {
    /// `hvm_start_info` itself.
    StartInfo,
    /// The memory map table.
    Memmap,
    /// The module list.
    Modlist,
    /// The command line.
    Cmdline,
}

/// Why `hvm_start_info` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HvmError {
    /// A pointer that is null, misaligned, or whose range overflows or is
    /// beyond what can be read.
    BadPointer {
        /// What it points to.
        what: Pointee,
        /// The physical address.
        paddr: u64,
        /// The bytes it should cover.
        len: u64,
    },
    /// Wrong magic number.
    BadMagic(u32),
    /// Version 0 has no memory map; version 1 or later is needed.
    NoMemoryMap(u32),
    /// More memory-map entries than [`MAX_MEMMAP_ENTRIES`], or none.
    BadMemmapEntries(u32),
    /// The memory map itself is inconsistent.
    Memmap(MemmapError),
    /// More modules than [`MAX_MODULES`].
    TooManyModules(u32),
    /// A module whose range overflows.
    BadModule {
        /// Its index.
        index: usize,
        /// Its physical address.
        paddr: u64,
        /// Its size.
        size: u64,
    },
}

impl fmt::Display for Pointee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pointee::StartInfo => "hvm_start_info",
            Pointee::Memmap => "memory map",
            Pointee::Modlist => "module list",
            Pointee::Cmdline => "command line",
        })
    }
}

impl fmt::Display for HvmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HvmError::BadPointer { what, paddr, len } => write!(
                f,
                "the {what} at {paddr:#x} ({len:#x} bytes) is null, misaligned or not readable"
            ),
            HvmError::BadMagic(m) => {
                write!(f, "hvm_start_info magic {m:#x}, not {HVM_START_MAGIC:#x}")
            }
            HvmError::NoMemoryMap(v) => {
                write!(f, "hvm_start_info version {v} has no memory map (need 1)")
            }
            HvmError::BadMemmapEntries(n) => write!(
                f,
                "hvm_start_info has {n} memory-map entries (need 1 to {MAX_MEMMAP_ENTRIES})"
            ),
            HvmError::Memmap(e) => write!(f, "{e}"),
            HvmError::TooManyModules(n) => {
                write!(f, "{n} boot modules; at most {MAX_MODULES} are supported")
            }
            HvmError::BadModule { index, paddr, size } => write!(
                f,
                "boot module {index} ({size:#x} bytes at {paddr:#x}) ends beyond 2^64"
            ),
        }
    }
}

/// A boot module `[start, end)` in physical bytes (an initrd, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Module {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// What the kernel keeps from `hvm_start_info`.
#[derive(Clone)]
pub struct HvmBoot {
    /// Physical address of `hvm_start_info`.
    pub start_info_paddr: u64,
    /// Protocol version.
    pub version: u32,
    /// The memory map, normalised.
    pub memmap: MemoryMap,
    /// The command line.
    pub cmdline: Cmdline,
    /// Physical address of the ACPI RSDP (0 if none).
    pub rsdp_paddr: u64,
    /// Modules; the first `nr_modules` are valid.
    pub modules: [Module; MAX_MODULES],
    /// Number of modules.
    pub nr_modules: usize,
}

impl HvmBoot {
    /// The modules.
    pub fn modules(&self) -> &[Module] {
        &self.modules[..self.nr_modules]
    }
}

/// Checks that `[paddr, paddr + len)` can be read from `mem`.
fn check(
    mem: &impl BootMemory,
    what: Pointee,
    paddr: u64,
    len: u64,
    align: u64,
) -> Result<(), HvmError> {
    let fits = paddr != 0
        && paddr % align == 0
        && paddr.checked_add(len).is_some_and(|end| end <= mem.limit());
    if fits {
        Ok(())
    } else {
        Err(HvmError::BadPointer { what, paddr, len })
    }
}

/// Reads a plain-integer `repr(C)` structure at `paddr` (range checked).
fn read_struct<T: Copy + Default>(
    mem: &impl BootMemory,
    what: Pointee,
    paddr: u64,
) -> Result<T, HvmError> {
    check(mem, what, paddr, size_of::<T>() as u64, 1)?;
    let mut value = T::default();
    // SAFETY: `T` is one of this module's `repr(C)` structures of integers,
    // for which every byte pattern is a valid value; the slice covers
    // exactly `value` and lives as long as this borrow.
    let bytes = unsafe {
        core::slice::from_raw_parts_mut((&mut value as *mut T).cast::<u8>(), size_of::<T>())
    };
    mem.read(paddr, bytes);
    Ok(value)
}

/// Parses and checks the `hvm_start_info` at physical `paddr`.
pub fn parse(mem: &impl BootMemory, paddr: u64) -> Result<HvmBoot, HvmError> {
    check(
        mem,
        Pointee::StartInfo,
        paddr,
        size_of::<HvmStartInfo>() as u64,
        8,
    )?;
    let si: HvmStartInfo = read_struct(mem, Pointee::StartInfo, paddr)?;
    if si.magic != HVM_START_MAGIC {
        return Err(HvmError::BadMagic(si.magic));
    }
    if si.version < 1 {
        return Err(HvmError::NoMemoryMap(si.version));
    }

    if si.memmap_entries == 0 || si.memmap_entries > MAX_MEMMAP_ENTRIES {
        return Err(HvmError::BadMemmapEntries(si.memmap_entries));
    }
    let entry_size = size_of::<HvmMemmapEntry>() as u64;
    let table_len = u64::from(si.memmap_entries) * entry_size;
    check(mem, Pointee::Memmap, si.memmap_paddr, table_len, 8)?;
    let entries = (0..u64::from(si.memmap_entries)).map(|i| {
        let e: HvmMemmapEntry =
            read_struct(mem, Pointee::Memmap, si.memmap_paddr + i * entry_size).unwrap_or_default();
        (e.addr, e.size, e.kind)
    });
    let memmap =
        MemoryMap::from_entries(MapSource::HvmStartInfo, entries).map_err(HvmError::Memmap)?;

    let cmdline = if si.cmdline_paddr == 0 {
        Cmdline::empty()
    } else {
        check(mem, Pointee::Cmdline, si.cmdline_paddr, 1, 1)?;
        // As much as is readable, up to the buffer: a line without a NUL in
        // there is reported truncated by `Cmdline`.
        let len = (CMDLINE_MAX as u64).min(mem.limit() - si.cmdline_paddr) as usize;
        let mut bytes = [0u8; CMDLINE_MAX];
        mem.read(si.cmdline_paddr, &mut bytes[..len]);
        Cmdline::from_nul_terminated(&bytes[..len])
    };

    let nr_modules = si.nr_modules as usize;
    if nr_modules > MAX_MODULES {
        return Err(HvmError::TooManyModules(si.nr_modules));
    }
    let mut modules = [Module::default(); MAX_MODULES];
    if nr_modules > 0 {
        let entry_size = size_of::<HvmModlistEntry>() as u64;
        check(
            mem,
            Pointee::Modlist,
            si.modlist_paddr,
            nr_modules as u64 * entry_size,
            8,
        )?;
        for (index, slot) in modules.iter_mut().enumerate().take(nr_modules) {
            let m: HvmModlistEntry = read_struct(
                mem,
                Pointee::Modlist,
                si.modlist_paddr + index as u64 * entry_size,
            )?;
            let end = m.paddr.checked_add(m.size).ok_or(HvmError::BadModule {
                index,
                paddr: m.paddr,
                size: m.size,
            })?;
            *slot = Module {
                start: m.paddr,
                end,
            };
        }
    }

    Ok(HvmBoot {
        start_info_paddr: paddr,
        version: si.version,
        memmap,
        cmdline,
        rsdp_paddr: si.rsdp_paddr,
        modules,
        nr_modules,
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::boot::memmap::RegionKind;
    use std::vec;
    use std::vec::Vec;

    /// Guest memory `[0, bytes.len())` in a vector.
    struct Image(Vec<u8>);

    impl BootMemory for Image {
        fn limit(&self) -> u64 {
            self.0.len() as u64
        }
        fn read(&self, paddr: u64, out: &mut [u8]) {
            let at = paddr as usize;
            out.copy_from_slice(&self.0[at..at + out.len()]);
        }
    }

    impl Image {
        fn put_u32(&mut self, at: u64, v: u32) {
            self.0[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
        }
        fn put_u64(&mut self, at: u64, v: u64) {
            self.0[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
        }
        fn put_bytes(&mut self, at: u64, b: &[u8]) {
            self.0[at as usize..at as usize + b.len()].copy_from_slice(b);
        }
    }

    const SI: u64 = 0x1000;
    const MEMMAP: u64 = 0x2000;
    const MODLIST: u64 = 0x3000;
    const CMDLINE: u64 = 0x4000;

    /// A loader's layout: two RAM regions and a hole, `modules` modules.
    fn image(modules: u32) -> Image {
        let mut m = Image(vec![0; 0x1_0000]);
        m.put_u32(SI, HVM_START_MAGIC);
        m.put_u32(SI + 4, 1);
        m.put_u32(SI + 12, modules);
        m.put_u64(SI + 16, MODLIST);
        m.put_u64(SI + 24, CMDLINE);
        m.put_u64(SI + 40, MEMMAP);
        m.put_u32(SI + 48, 3);
        for (i, (addr, size, kind)) in [
            (0x10_0000u64, 0x1f00_0000u64, 1u32),
            (0u64, 0x9_fc00u64, 1u32),
            (0xf_0000u64, 0x1_0000u64, 2u32),
        ]
        .iter()
        .enumerate()
        {
            let at = MEMMAP + i as u64 * 24;
            m.put_u64(at, *addr);
            m.put_u64(at + 8, *size);
            m.put_u32(at + 16, *kind);
        }
        for i in 0..u64::from(modules) {
            m.put_u64(MODLIST + i * 32, 0x100_0000 + i * 0x10_0000);
            m.put_u64(MODLIST + i * 32 + 8, 0x1234);
        }
        m.put_bytes(CMDLINE, b"pvmmu.4k console=x\0");
        m
    }

    #[test]
    fn a_sound_start_info_is_read_whole() {
        let boot = parse(&image(12), SI).unwrap();
        assert_eq!(boot.version, 1);
        assert_eq!(boot.cmdline.as_str(), "pvmmu.4k console=x");
        // Sorted on the way in.
        let kinds: Vec<_> = boot
            .memmap
            .regions()
            .iter()
            .map(|r| (r.start, r.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                (0, RegionKind::Ram),
                (0xf_0000, RegionKind::Reserved),
                (0x10_0000, RegionKind::Ram)
            ]
        );
        // All twelve modules, not the first eight.
        assert_eq!(boot.modules().len(), 12);
        assert_eq!(
            boot.modules()[11],
            Module {
                start: 0x100_0000 + 11 * 0x10_0000,
                end: 0x100_0000 + 11 * 0x10_0000 + 0x1234
            }
        );
    }

    #[test]
    fn each_bad_input_gives_its_error() {
        let err = |m: &Image| parse(m, SI).err().unwrap();
        assert!(matches!(
            parse(&image(0), 0).err().unwrap(),
            HvmError::BadPointer {
                what: Pointee::StartInfo,
                ..
            }
        ));
        assert!(matches!(
            parse(&image(0), SI + 4).err().unwrap(),
            HvmError::BadPointer {
                what: Pointee::StartInfo,
                ..
            }
        ));
        assert!(matches!(
            parse(&image(0), u64::MAX - 8).err().unwrap(),
            HvmError::BadPointer { .. }
        ));
        let mut m = image(0);
        m.put_u32(SI, 0x1234);
        assert_eq!(err(&m), HvmError::BadMagic(0x1234));
        let mut m = image(0);
        m.put_u32(SI + 4, 0);
        assert_eq!(err(&m), HvmError::NoMemoryMap(0));
        let mut m = image(0);
        m.put_u32(SI + 48, 0);
        assert_eq!(err(&m), HvmError::BadMemmapEntries(0));
        let mut m = image(0);
        m.put_u32(SI + 48, u32::MAX);
        assert_eq!(err(&m), HvmError::BadMemmapEntries(u32::MAX));
        let mut m = image(0);
        m.put_u64(SI + 40, 0xff00);
        m.put_u32(SI + 48, 100);
        assert!(matches!(
            err(&m),
            HvmError::BadPointer {
                what: Pointee::Memmap,
                ..
            }
        ));
        let mut m = image(0);
        m.put_u64(MEMMAP + 8, u64::MAX);
        assert!(matches!(
            err(&m),
            HvmError::Memmap(MemmapError::Overflow { .. })
        ));
        let mut m = image(0);
        m.put_u32(MEMMAP + 2 * 24 + 16, 1);
        m.put_u64(MEMMAP + 2 * 24 + 8, 0x20_0000);
        m.put_u32(MEMMAP + 16, 2);
        assert!(matches!(
            err(&m),
            HvmError::Memmap(MemmapError::Conflict { .. })
        ));
        let m = image(33);
        assert_eq!(err(&m), HvmError::TooManyModules(33));
        let mut m = image(2);
        m.put_u64(MODLIST + 32 + 8, u64::MAX);
        assert!(matches!(err(&m), HvmError::BadModule { index: 1, .. }));
        let mut m = image(2);
        m.put_u64(SI + 16, 0xfff0);
        assert!(matches!(
            err(&m),
            HvmError::BadPointer {
                what: Pointee::Modlist,
                ..
            }
        ));
        let mut m = image(0);
        m.put_u64(SI + 24, 0x1_0000);
        assert!(matches!(
            err(&m),
            HvmError::BadPointer {
                what: Pointee::Cmdline,
                ..
            }
        ));
        // A command line running into the end of readable memory is read up
        // to there and reported truncated, not read beyond.
        let mut m = image(0);
        m.put_u64(SI + 24, 0xfffc);
        m.put_bytes(0xfffc, b"abcd");
        assert!(parse(&m, SI).unwrap().cmdline.problem().is_some());
    }

    /// Random corruption of a sound image never panics and never yields a
    /// module or region past what the fields say.
    #[test]
    fn random_corruption_never_panics() {
        let mut next = crate::boot::test_rng(0xdead_beef_cafe_f00du64);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut m = image((next() % 40) as u32);
            for _ in 0..1 + next() % 4 {
                let at = match next() % 4 {
                    0 => SI + next() % 56,
                    1 => MEMMAP + next() % 72,
                    2 => MODLIST + next() % 128,
                    _ => CMDLINE + next() % 24,
                };
                m.0[at as usize] = next() as u8;
            }
            if let Ok(boot) = parse(&m, SI) {
                accepted += 1;
                assert!(boot.nr_modules <= MAX_MODULES);
                for module in boot.modules() {
                    assert!(module.start <= module.end);
                }
                for w in boot.memmap.regions().windows(2) {
                    assert!(w[0].end <= w[1].start);
                }
            }
        }
        assert!(accepted > 100, "only {accepted} accepted");
    }
}
