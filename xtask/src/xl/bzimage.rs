//! Extraction of the uncompressed ELF `vmlinux` from a Linux x86 `bzImage`.
//!
//! Xen can start a PV dom0 from the compressed bzImage, but then it unpacks
//! the xz payload itself, which takes seconds under QEMU's TCG. The xtask
//! hands Xen the ELF inside instead.
//!
//! Invariant: [`extract_vmlinux`] returns bytes only if the setup header is a
//! valid x86 boot header (protocol 2.08 or later, which records where the
//! compressed payload is), the payload decompresses completely, its length
//! matches the size the kernel build appended after the payload, and the
//! result is a 64-bit ELF file. Nothing is guessed from byte patterns.

use std::fmt;
use std::io::Read;

/// Offset of `setup_sects` in the boot sector.
const SETUP_SECTS: usize = 0x1f1;
/// Offset of the `HdrS` magic.
const HEADER_MAGIC: usize = 0x202;
/// Offset of the boot protocol version.
const PROTOCOL_VERSION: usize = 0x206;
/// Offset of `payload_offset` (protocol 2.08+), relative to the protected-mode code.
const PAYLOAD_OFFSET: usize = 0x248;
/// Offset of `payload_length` (protocol 2.08+).
const PAYLOAD_LENGTH: usize = 0x24c;
/// The first protocol version with `payload_offset` / `payload_length`.
const MIN_PROTOCOL: u16 = 0x0208;

/// How the payload is compressed, from its leading magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// `FD 37 7A 58 5A 00`: the xz container (Debian's choice, with the x86 BCJ filter).
    Xz,
    /// `1F 8B`: gzip.
    Gzip,
    /// `28 B5 2F FD`: zstd.
    Zstd,
}

impl Compression {
    fn detect(payload: &[u8]) -> Option<Compression> {
        if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Some(Compression::Xz)
        } else if payload.starts_with(&[0x1f, 0x8b]) {
            Some(Compression::Gzip)
        } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Compression::Zstd)
        } else {
            None
        }
    }
}

/// Why a vmlinux could not be extracted.
#[derive(Debug, PartialEq, Eq)]
pub enum BzImageError {
    /// The file is too short to hold the field at this offset.
    Truncated(usize),
    /// No `HdrS` magic at 0x202: not a bzImage.
    NotBzImage,
    /// The boot protocol predates the payload fields.
    OldProtocol(u16),
    /// `payload_offset` / `payload_length` point outside the file.
    PayloadOutOfRange {
        /// Start of the payload in the file.
        start: u64,
        /// Its length.
        length: u64,
        /// The file's length.
        file: u64,
    },
    /// The payload starts with no magic this extractor knows (lz4, lzo, bzip2, lzma).
    UnknownCompression([u8; 6]),
    /// The decompressor failed.
    Decompress {
        /// Which one.
        compression: Compression,
        /// Its message.
        reason: String,
    },
    /// The decompressed size differs from the size appended to the payload.
    SizeMismatch {
        /// Size recorded after the payload.
        expected: u64,
        /// Size decompressed.
        got: u64,
    },
    /// The payload is not a 64-bit ELF file.
    NotElf64,
}

impl fmt::Display for BzImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BzImageError::Truncated(at) => write!(f, "file ends before offset {at:#x}"),
            BzImageError::NotBzImage => write!(f, "no `HdrS` boot header: not a bzImage"),
            BzImageError::OldProtocol(v) => write!(
                f,
                "boot protocol {}.{:02} has no payload fields (needs 2.08)",
                v >> 8,
                v & 0xff
            ),
            BzImageError::PayloadOutOfRange {
                start,
                length,
                file,
            } => write!(
                f,
                "payload {start:#x}+{length:#x} lies outside the {file:#x}-byte file"
            ),
            BzImageError::UnknownCompression(magic) => {
                write!(
                    f,
                    "payload compression not recognised (starts {magic:02x?})"
                )
            }
            BzImageError::Decompress {
                compression,
                reason,
            } => write!(f, "{compression:?} decompression failed: {reason}"),
            BzImageError::SizeMismatch { expected, got } => write!(
                f,
                "decompressed {got} bytes but the image records {expected}"
            ),
            BzImageError::NotElf64 => write!(f, "the payload is not a 64-bit ELF file"),
        }
    }
}

impl std::error::Error for BzImageError {}

fn bytes_at<const N: usize>(image: &[u8], at: usize) -> Result<[u8; N], BzImageError> {
    image
        .get(at..at + N)
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .ok_or(BzImageError::Truncated(at + N))
}

/// The compressed payload of `image` (with the 4-byte size the build appends
/// after it) and how it is compressed.
pub fn payload(image: &[u8]) -> Result<(&[u8], Compression), BzImageError> {
    if &bytes_at::<4>(image, HEADER_MAGIC)? != b"HdrS" {
        return Err(BzImageError::NotBzImage);
    }
    let version = u16::from_le_bytes(bytes_at(image, PROTOCOL_VERSION)?);
    if version < MIN_PROTOCOL {
        return Err(BzImageError::OldProtocol(version));
    }
    // A setup_sects of 0 means 4, for compatibility with ancient loaders.
    let setup_sects = match bytes_at::<1>(image, SETUP_SECTS)?[0] {
        0 => 4,
        n => u64::from(n),
    };
    let protected_mode = (setup_sects + 1) * 512;
    let offset = u64::from(u32::from_le_bytes(bytes_at(image, PAYLOAD_OFFSET)?));
    let length = u64::from(u32::from_le_bytes(bytes_at(image, PAYLOAD_LENGTH)?));
    let start = protected_mode + offset;
    let file = image.len() as u64;
    let out_of_range = BzImageError::PayloadOutOfRange {
        start,
        length,
        file,
    };
    if length < 8 || start.checked_add(length).is_none_or(|end| end > file) {
        return Err(out_of_range);
    }
    let payload = &image[start as usize..(start + length) as usize];
    let compression = Compression::detect(payload)
        .ok_or_else(|| BzImageError::UnknownCompression(bytes_at(payload, 0).unwrap_or([0; 6])))?;
    Ok((payload, compression))
}

/// Decompresses `payload` (which ends with the 4-byte little-endian size of
/// the decompressed data, as the kernel build appends it).
pub fn decompress(payload: &[u8], compression: Compression) -> Result<Vec<u8>, BzImageError> {
    let size_at = payload.len().saturating_sub(4);
    let expected = u64::from(u32::from_le_bytes(bytes_at(payload, size_at)?));
    let mut out = Vec::with_capacity(expected as usize);
    let failed = |reason: String| BzImageError::Decompress {
        compression,
        reason,
    };
    match compression {
        Compression::Xz => {
            // The decoder takes an owned reader; the payload is a few MiB.
            let mut reader = xz4rust::XzReader::new(std::io::Cursor::new(payload.to_vec()));
            reader
                .read_to_end(&mut out)
                .map_err(|e| failed(e.to_string()))?;
        }
        Compression::Gzip => {
            flate2::read::GzDecoder::new(payload)
                .read_to_end(&mut out)
                .map_err(|e| failed(e.to_string()))?;
        }
        Compression::Zstd => {
            let mut compressed = &payload[..size_at];
            let mut decoder = ruzstd::decoding::StreamingDecoder::new(&mut compressed)
                .map_err(|e| failed(e.to_string()))?;
            decoder
                .read_to_end(&mut out)
                .map_err(|e| failed(e.to_string()))?;
        }
    }
    if out.len() as u64 != expected {
        return Err(BzImageError::SizeMismatch {
            expected,
            got: out.len() as u64,
        });
    }
    Ok(out)
}

/// The uncompressed ELF `vmlinux` inside the bzImage `image`.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let (payload, compression) = payload(image)?;
    let vmlinux = decompress(payload, compression)?;
    // ELF magic, then EI_CLASS = ELFCLASS64.
    if !vmlinux.starts_with(b"\x7fELF") || vmlinux.get(4) != Some(&2) {
        return Err(BzImageError::NotElf64);
    }
    Ok(vmlinux)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A synthetic bzImage: 2 setup sectors plus the boot sector, then
    /// `prefix` bytes of decompressor code, then `payload`, then trailing code.
    fn image(payload: &[u8], prefix: usize, version: u16) -> Vec<u8> {
        let setup_sects = 2u8;
        let pm = (usize::from(setup_sects) + 1) * 512;
        let mut image = vec![0u8; pm + prefix];
        image[SETUP_SECTS] = setup_sects;
        image[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        image[PROTOCOL_VERSION..PROTOCOL_VERSION + 2].copy_from_slice(&version.to_le_bytes());
        image[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&(prefix as u32).to_le_bytes());
        image[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(payload);
        image.extend_from_slice(&[0xcc; 100]);
        image
    }

    fn fake_elf() -> Vec<u8> {
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.extend((0..20_000u32).map(|i| (i * 7 % 251) as u8));
        elf
    }

    fn gzip_with_size(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).unwrap();
        // gzip's own trailer ends with ISIZE, the same 4 bytes the kernel appends.
        encoder.finish().unwrap()
    }

    #[test]
    fn gzip_payload_round_trips() {
        let elf = fake_elf();
        let bz = image(&gzip_with_size(&elf), 0x1234, 0x020f);
        let (payload, compression) = payload(&bz).unwrap();
        assert_eq!(compression, Compression::Gzip);
        assert_eq!(payload[0], 0x1f);
        assert_eq!(extract_vmlinux(&bz).unwrap(), elf);
    }

    #[test]
    fn wrong_recorded_size_is_caught() {
        let elf = fake_elf();
        let mut gz = gzip_with_size(&elf);
        // A payload whose appended size disagrees: decompression still runs,
        // the check refuses it (flate2 itself may also reject the ISIZE).
        let n = gz.len();
        gz[n - 4..].copy_from_slice(&1u32.to_le_bytes());
        let err = extract_vmlinux(&image(&gz, 64, 0x020f)).unwrap_err();
        assert!(
            matches!(
                err,
                BzImageError::SizeMismatch { expected: 1, .. } | BzImageError::Decompress { .. }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn header_errors() {
        let gz = gzip_with_size(&fake_elf());
        assert_eq!(payload(&[0u8; 100]), Err(BzImageError::Truncated(0x206)));
        let mut not_bz = image(&gz, 0, 0x020f);
        not_bz[HEADER_MAGIC] = b'X';
        assert_eq!(payload(&not_bz), Err(BzImageError::NotBzImage));
        assert_eq!(
            payload(&image(&gz, 0, 0x0206)),
            Err(BzImageError::OldProtocol(0x0206))
        );
        let mut too_long = image(&gz, 0, 0x020f);
        too_long[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            payload(&too_long),
            Err(BzImageError::PayloadOutOfRange { .. })
        ));
        let mut lz4 = gz.clone();
        lz4[..4].copy_from_slice(&[0x02, 0x21, 0x4c, 0x18]);
        assert!(matches!(
            payload(&image(&lz4, 0, 0x020f)),
            Err(BzImageError::UnknownCompression(_))
        ));
    }

    #[test]
    fn not_elf_is_refused() {
        let bz = image(&gzip_with_size(&[0x55; 4096]), 0, 0x020f);
        assert_eq!(extract_vmlinux(&bz), Err(BzImageError::NotElf64));
    }

    #[test]
    fn xz_payload_is_detected_and_corruption_reported() {
        // A real xz stream header followed by garbage: detected as xz, and the
        // decoder's failure comes back as an error, not a panic.
        let mut xz = vec![0xfd, b'7', b'z', b'X', b'Z', 0, 0, 1];
        xz.extend_from_slice(&[0x42; 64]);
        let bz = image(&xz, 0, 0x020f);
        assert_eq!(payload(&bz).unwrap().1, Compression::Xz);
        assert!(matches!(
            extract_vmlinux(&bz),
            Err(BzImageError::Decompress {
                compression: Compression::Xz,
                ..
            })
        ));
    }
}
