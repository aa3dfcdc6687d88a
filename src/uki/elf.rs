//! Just enough ELF to build an initramfs from a foreign root: the machine, the program interpreter
//! (`PT_INTERP`), the `DT_NEEDED` libraries and a named section (a module's `.modinfo`).
//! ELF32/ELF64, either byte order; nothing is executed.

/// A section header: (name offset, type, file offset, size, link).
type SectionEntry = (u32, u32, u64, u64, u32);

/// A parsed view over an ELF file's bytes.
pub struct Elf<'a> {
    data: &'a [u8],
    is64: bool,
    le: bool,
}

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Option<Elf<'a>> {
        if data.get(0..4)? != b"\x7fELF" {
            return None;
        }
        let is64 = match data.get(4)? {
            1 => false,
            2 => true,
            _ => return None,
        };
        let le = match data.get(5)? {
            1 => true,
            2 => false,
            _ => return None,
        };
        Some(Elf { data, is64, le })
    }

    fn u16(&self, off: usize) -> Option<u16> {
        let b: [u8; 2] = self.data.get(off..off + 2)?.try_into().ok()?;
        Some(if self.le { u16::from_le_bytes(b) } else { u16::from_be_bytes(b) })
    }

    fn u32(&self, off: usize) -> Option<u32> {
        let b: [u8; 4] = self.data.get(off..off + 4)?.try_into().ok()?;
        Some(if self.le { u32::from_le_bytes(b) } else { u32::from_be_bytes(b) })
    }

    fn u64(&self, off: usize) -> Option<u64> {
        let b: [u8; 8] = self.data.get(off..off + 8)?.try_into().ok()?;
        Some(if self.le { u64::from_le_bytes(b) } else { u64::from_be_bytes(b) })
    }

    /// A word: 4 bytes in ELF32, 8 in ELF64.
    fn word(&self, off: usize) -> Option<u64> {
        if self.is64 { self.u64(off) } else { self.u32(off).map(u64::from) }
    }

    pub fn machine(&self) -> Option<u16> {
        self.u16(18)
    }

    fn program_headers(&self) -> Option<Vec<(u32, u64, u64)>> {
        let (phoff, phentsize, phnum) = if self.is64 {
            (self.u64(32)? as usize, self.u16(54)? as usize, self.u16(56)? as usize)
        } else {
            (self.u32(28)? as usize, self.u16(42)? as usize, self.u16(44)? as usize)
        };
        let mut out = Vec::with_capacity(phnum);
        for i in 0..phnum {
            let h = phoff + i * phentsize;
            let kind = self.u32(h)?;
            let (offset, filesz) = if self.is64 {
                (self.u64(h + 8)?, self.u64(h + 32)?)
            } else {
                (u64::from(self.u32(h + 4)?), u64::from(self.u32(h + 16)?))
            };
            out.push((kind, offset, filesz));
        }
        Some(out)
    }

    /// The program interpreter (`/lib/ld-linux-aarch64.so.1`), for dynamically linked executables.
    pub fn interpreter(&self) -> Option<String> {
        const PT_INTERP: u32 = 3;
        let (_, off, size) = self.program_headers()?.into_iter().find(|(k, _, _)| *k == PT_INTERP)?;
        let bytes = self.data.get(off as usize..(off + size) as usize)?;
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        Some(String::from_utf8_lossy(&bytes[..end]).into_owned())
    }

    /// Section headers as (name offset, type, file offset, size, link).
    fn sections(&self) -> Option<Vec<SectionEntry>> {
        let (shoff, shentsize, shnum) = if self.is64 {
            (self.u64(40)? as usize, self.u16(58)? as usize, self.u16(60)? as usize)
        } else {
            (self.u32(32)? as usize, self.u16(46)? as usize, self.u16(48)? as usize)
        };
        let mut out = Vec::with_capacity(shnum);
        for i in 0..shnum {
            let h = shoff + i * shentsize;
            let name = self.u32(h)?;
            let kind = self.u32(h + 4)?;
            let (offset, size, link) = if self.is64 {
                (self.u64(h + 24)?, self.u64(h + 32)?, self.u32(h + 40)?)
            } else {
                (u64::from(self.u32(h + 16)?), u64::from(self.u32(h + 20)?), self.u32(h + 24)?)
            };
            out.push((name, kind, offset, size, link));
        }
        Some(out)
    }

    fn cstr(&self, table_off: u64, index: u64) -> Option<String> {
        let start = (table_off + index) as usize;
        let rest = self.data.get(start..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&rest[..end]).into_owned())
    }

    /// The bytes of the section called `name` (e.g. `.modinfo`).
    pub fn section(&self, name: &str) -> Option<&'a [u8]> {
        let sections = self.sections()?;
        let shstrndx = if self.is64 { self.u16(62)? } else { self.u16(50)? } as usize;
        let (_, _, stroff, _, _) = *sections.get(shstrndx)?;
        sections.iter().find_map(|&(n, _, off, size, _)| {
            (self.cstr(stroff, u64::from(n)).as_deref() == Some(name))
                .then(|| self.data.get(off as usize..(off + size) as usize))
                .flatten()
        })
    }

    /// The `DT_NEEDED` entries (sonames) of a dynamically linked file.
    pub fn needed(&self) -> Vec<String> {
        const SHT_DYNAMIC: u32 = 6;
        const DT_NEEDED: u64 = 1;
        let Some(sections) = self.sections() else { return Vec::new() };
        let Some(&(_, _, off, size, link)) = sections.iter().find(|s| s.1 == SHT_DYNAMIC) else {
            return Vec::new();
        };
        let Some(&(_, _, stroff, _, _)) = sections.get(link as usize) else { return Vec::new() };
        let entsize = if self.is64 { 16 } else { 8 };
        let mut out = Vec::new();
        let mut at = off as usize;
        while at + entsize <= (off + size) as usize {
            let (Some(tag), Some(val)) = (self.word(at), self.word(at + entsize / 2)) else { break };
            if tag == 0 {
                break;
            }
            if tag == DT_NEEDED
                && let Some(name) = self.cstr(stroff, val)
            {
                out.push(name);
            }
            at += entsize;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_hosts_own_binaries() {
        let data = std::fs::read("/bin/sh").or_else(|_| std::fs::read("/usr/bin/sh")).unwrap();
        let data = if data.starts_with(b"\x7fELF") { data } else { std::fs::read("/usr/bin/env").unwrap() };
        let elf = Elf::parse(&data).unwrap();
        assert!(elf.machine().is_some());
        let needed = elf.needed();
        assert!(needed.iter().any(|n| n.starts_with("libc.so")), "{needed:?}");
        assert!(elf.interpreter().unwrap().contains("ld-"));
        assert!(elf.section(".dynstr").is_some());
        assert!(Elf::parse(b"#!/bin/sh\n").is_none());
    }
}
