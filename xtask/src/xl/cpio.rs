//! A writer for the `newc` cpio format, the one the Linux kernel unpacks as an
//! initramfs.
//!
//! Invariant: every archive this writer produces is complete and well formed
//! once [`CpioWriter::finish`] has returned: each entry is a 110-byte ASCII
//! header, the NUL-terminated name padded to 4 bytes, the data padded to 4
//! bytes, and the archive ends with the `TRAILER!!!` entry. Every entry has
//! its own inode number and a link count of 1 (directories 2), so the kernel
//! never mistakes two files for hard links of each other, even across two
//! concatenated archives built with different `first_ino`. Owner and mtime are
//! always 0, so the same inputs give byte-identical archives.

use std::io::{self, Write};

/// File type bits of `st_mode` as cpio stores them.
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Name of the entry that ends an archive.
const TRAILER: &str = "TRAILER!!!";

/// Streams `newc` entries into `out`.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

/// One header's numeric fields, in the order the format lists them.
struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdevmajor: u32,
    rdevminor: u32,
}

impl<W: Write> CpioWriter<W> {
    /// A writer whose entries get inode numbers from `first_ino` on.
    pub fn new(out: W, first_ino: u32) -> Self {
        CpioWriter {
            out,
            next_ino: first_ino,
            written: 0,
        }
    }

    /// Adds a directory. Parents must have been added before (the kernel does
    /// not create missing parents).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, &[], (0, 0))
    }

    /// Adds a regular file with `contents`.
    pub fn file(&mut self, path: &str, perm: u32, contents: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, contents, (0, 0))
    }

    /// Adds a symbolic link `path` -> `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0))
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, &[], (major, minor))
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(
            TRAILER,
            &Header {
                ino: 0,
                mode: 0,
                nlink: 1,
                filesize: 0,
                rdevmajor: 0,
                rdevminor: 0,
            },
        )?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        contents: &[u8],
        (rdevmajor, rdevminor): (u32, u32),
    ) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') || name == TRAILER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{path}` cannot be a cpio entry name"),
            ));
        }
        let filesize = u32::try_from(contents.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{path}` is larger than newc's 4 GiB limit"),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino = self.next_ino.wrapping_add(1);
        self.header(
            name,
            &Header {
                ino,
                mode,
                nlink,
                filesize,
                rdevmajor,
                rdevminor,
            },
        )?;
        self.out.write_all(contents)?;
        self.written += contents.len() as u64;
        self.pad()
    }

    fn header(&mut self, name: &str, h: &Header) -> io::Result<()> {
        let namesize = name.len() + 1;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor
        // rdevminor namesize check
        let fields = [
            h.ino,
            h.mode,
            0,
            0,
            h.nlink,
            0,
            h.filesize,
            0,
            0,
            h.rdevmajor,
            h.rdevminor,
            namesize as u32,
            0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for field in fields {
            header.push_str(&format!("{field:08X}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.written += (header.len() + namesize) as u64;
        self.pad()
    }

    fn pad(&mut self) -> io::Result<()> {
        let padding = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..padding])?;
        self.written += padding as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parsed entry: name, mode, nlink, ino, data.
    type Parsed = (String, u32, u32, u32, Vec<u8>);

    /// A minimal independent reader: walks the headers the way the kernel's
    /// unpacker does and returns the entries before the trailer.
    fn parse(mut bytes: &[u8]) -> Vec<Parsed> {
        let mut entries = Vec::new();
        let mut offset = 0usize;
        loop {
            assert_eq!(&bytes[..6], b"070701", "magic at offset {offset}");
            let field = |i: usize| {
                let text = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap();
                u32::from_str_radix(text, 16).unwrap()
            };
            let (ino, mode, nlink, filesize, namesize) =
                (field(0), field(1), field(4), field(6), field(11));
            let name_end = 110 + namesize as usize;
            let name = std::str::from_utf8(&bytes[110..name_end - 1])
                .unwrap()
                .to_string();
            assert_eq!(bytes[name_end - 1], 0, "name of {name} is NUL-terminated");
            let data_start = name_end.next_multiple_of(4);
            let data_end = data_start + filesize as usize;
            let next = data_end.next_multiple_of(4);
            if name == TRAILER {
                assert_eq!(next, bytes.len(), "nothing after the trailer");
                return entries;
            }
            entries.push((name, mode, nlink, ino, bytes[data_start..data_end].to_vec()));
            offset += next;
            bytes = &bytes[next..];
        }
    }

    #[test]
    fn entries_read_back_with_types_sizes_and_padding() {
        let mut cpio = CpioWriter::new(Vec::new(), 7);
        cpio.dir("/bin", 0o755).unwrap();
        cpio.file("bin/a", 0o644, b"hello").unwrap();
        cpio.file("bin/ab", 0o755, b"").unwrap();
        cpio.symlink("bin/sh", "busybox").unwrap();
        cpio.char_dev("dev/console", 0o600, 5, 1).unwrap();
        let bytes = cpio.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);

        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["bin", "bin/a", "bin/ab", "bin/sh", "dev/console"]);
        assert_eq!(entries[0].1, 0o040_755);
        assert_eq!(entries[0].2, 2);
        assert_eq!(entries[1].1, 0o100_644);
        assert_eq!(entries[1].4, b"hello");
        assert_eq!(entries[2].1, 0o100_755);
        assert_eq!(entries[3].1, 0o120_777);
        assert_eq!(entries[3].4, b"busybox");
        assert_eq!(entries[4].1, 0o020_600);
        let inos: Vec<u32> = entries.iter().map(|e| e.3).collect();
        assert_eq!(inos, [7, 8, 9, 10, 11]);

        // rdevmajor/rdevminor of the device node are fields 9 and 10.
        let console_at = bytes
            .windows(b"dev/console".len())
            .position(|w| w == b"dev/console")
            .unwrap()
            - 110;
        let header = std::str::from_utf8(&bytes[console_at..console_at + 110]).unwrap();
        assert_eq!(&header[6 + 8 * 9..6 + 8 * 10], "00000005");
        assert_eq!(&header[6 + 8 * 10..6 + 8 * 11], "00000001");
    }

    #[test]
    fn same_input_same_bytes() {
        let build = || {
            let mut cpio = CpioWriter::new(Vec::new(), 1);
            cpio.file("init", 0o755, b"#!/bin/sh\n").unwrap();
            cpio.finish().unwrap()
        };
        assert_eq!(build(), build());
    }

    #[test]
    fn bad_names_are_refused() {
        let mut cpio = CpioWriter::new(Vec::new(), 1);
        assert!(cpio.file("/", 0o644, b"").is_err());
        assert!(cpio.file("TRAILER!!!", 0o644, b"").is_err());
        assert!(cpio.file("a\0b", 0o644, b"").is_err());
    }
}
