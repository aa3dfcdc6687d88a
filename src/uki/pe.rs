//! A minimal PE/COFF reader and the UKI section appender.
//!
//! [`add_sections`] turns a systemd-stub into a Unified Kernel Image the way systemd's `ukify`
//! (`pe_add_sections` in `src/ukify/ukify.py`, systemd 257 as in Debian trixie, the version the
//! test suite runs as an oracle) does, so that the sections are what ukify lays out for the same
//! inputs, minus the `.sbat` section ukify appends last:
//! - a trailing COFF symbol table is stripped when it sits at the end of the file;
//! - the stub's own sections get file offsets and raw sizes rounded up to `FileAlignment`;
//! - `SizeOfHeaders` is rounded up to `FileAlignment` to make room for new section headers;
//! - each new section gets its header after the last one, its data at the end of the file
//!   (file offset and raw size aligned to `FileAlignment`), its virtual address right after the
//!   previous section's (aligned to `SectionAlignment`), `MEM_READ` plus `CNT_CODE` for `.linux`
//!   and `CNT_INITIALIZED_DATA` otherwise; `SizeOfInitializedData` grows by its virtual size;
//! - when `.linux` is a PE image without `NX_COMPAT`, the flag is cleared in the UKI too (both
//!   must agree once firmware enforces it);
//! - a section's virtual size is its data's length unless the caller overrides it (newer ukify,
//!   after 257, gives `.linux` the kernel's `SizeOfImage`; [`NewSection::virtual_size`] allows it);
//! - `CheckSum` is zeroed (UEFI does not check it) and `SizeOfImage` covers the last section.
//!
//! No objcopy, no ukify: the stub is read and written here.

use std::path::PathBuf;

use crate::hint::Hint;

pub const IMAGE_SCN_CNT_CODE: u32 = 0x0000_0020;
pub const IMAGE_SCN_CNT_INITIALIZED_DATA: u32 = 0x0000_0040;
pub const IMAGE_SCN_MEM_READ: u32 = 0x4000_0000;
const IMAGE_FILE_LOCAL_SYMS_STRIPPED: u16 = 0x0008;
const SECTION_HEADER_SIZE: usize = 40;
const SYMBOL_SIZE: usize = 18;
const DIRECTORY_SECURITY: usize = 4;
const IMAGE_DLLCHARACTERISTICS_NX_COMPAT: u16 = 0x0100;

#[derive(Debug, thiserror::Error)]
pub enum PeError {
    #[error("{path} is not a PE image: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("the systemd-stub {path} is signed; dbh refuses to append sections to a signed stub")]
    Signed { path: PathBuf },
    #[error("the systemd-stub {path} has no header space left for section `{section}`")]
    NoHeaderSpace { path: PathBuf, section: String },
    #[error("section name `{name}` is not 1 to 8 printable ASCII characters")]
    BadSectionName { name: String },
    #[error("section `{name}` makes the image larger than 4 GiB")]
    TooLarge { name: String },
}

impl Hint for PeError {
    fn hint(&self) -> Option<String> {
        match self {
            PeError::Malformed { .. } | PeError::Signed { .. } | PeError::NoHeaderSpace { .. } => Some(
                "pass an unsigned systemd-stub (linux<arch>.efi.stub from systemd-boot-efi or systemd-utils[boot]) with --stub"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// One section header as read from or written to the section table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionHeader {
    pub name: String,
    pub virtual_size: u32,
    pub virtual_address: u32,
    pub size_of_raw_data: u32,
    pub pointer_to_raw_data: u32,
    pub characteristics: u32,
}

/// The parts of a PE image's headers the UKI writer reads and changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeInfo {
    pub machine: u16,
    pub pe32_plus: bool,
    pub section_alignment: u32,
    pub file_alignment: u32,
    pub size_of_image: u32,
    pub size_of_headers: u32,
    pub size_of_initialized_data: u32,
    pub checksum: u32,
    pub sections: Vec<SectionHeader>,
    pub dll_characteristics: u16,
    /// File offset of the COFF header's `Characteristics` etc. (`e_lfanew + 4`).
    coff: usize,
    /// File offset of the optional header.
    opt: usize,
    /// File offset of the section table.
    table: usize,
    pointer_to_symbol_table: u32,
    number_of_symbols: u32,
    security_dir_va: u32,
}

impl PeInfo {
    /// The raw bytes of a section (its file data, cut to its virtual size).
    pub fn section_data<'a>(&self, data: &'a [u8], name: &str) -> Option<&'a [u8]> {
        let s = self.sections.iter().find(|s| s.name == name)?;
        let start = s.pointer_to_raw_data as usize;
        let len = s.virtual_size.min(s.size_of_raw_data) as usize;
        data.get(start..start + len)
    }
}

/// One section to append.
#[derive(Debug, Clone)]
pub struct NewSection {
    pub name: String,
    pub data: Vec<u8>,
    /// Overrides the virtual size (ukify: the kernel's `SizeOfImage` for `.linux`).
    pub virtual_size: Option<u32>,
}

fn u16_at(d: &[u8], off: usize) -> Option<u16> {
    d.get(off..off + 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(d: &[u8], off: usize) -> Option<u32> {
    d.get(off..off + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn put_u16(d: &mut [u8], off: usize, v: u16) {
    d[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(d: &mut [u8], off: usize, v: u32) {
    d[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub fn round_up(x: u64, align: u64) -> u64 {
    if align == 0 { x } else { x.div_ceil(align) * align }
}

/// Parses the headers of a PE image. `path` only names the file in errors.
pub fn parse(data: &[u8], path: &std::path::Path) -> Result<PeInfo, PeError> {
    let bad = |reason: &str| PeError::Malformed { path: path.to_owned(), reason: reason.to_owned() };
    if data.get(0..2) != Some(b"MZ") {
        return Err(bad("no MZ signature"));
    }
    let lfanew = u32_at(data, 0x3c).ok_or_else(|| bad("truncated DOS header"))? as usize;
    if data.get(lfanew..lfanew + 4) != Some(b"PE\0\0") {
        return Err(bad("no PE signature at e_lfanew"));
    }
    let coff = lfanew + 4;
    let trunc = || bad("truncated COFF or optional header");
    let machine = u16_at(data, coff).ok_or_else(trunc)?;
    let nsections = u16_at(data, coff + 2).ok_or_else(trunc)? as usize;
    let pointer_to_symbol_table = u32_at(data, coff + 8).ok_or_else(trunc)?;
    let number_of_symbols = u32_at(data, coff + 12).ok_or_else(trunc)?;
    let size_of_optional = u16_at(data, coff + 16).ok_or_else(trunc)? as usize;
    let opt = coff + 20;
    let magic = u16_at(data, opt).ok_or_else(trunc)?;
    let pe32_plus = match magic {
        0x20b => true,
        0x10b => false,
        _ => return Err(bad("unknown optional header magic")),
    };
    let (nrva_off, dirs_off) = if pe32_plus { (108, 112) } else { (92, 96) };
    if size_of_optional < dirs_off {
        return Err(bad("optional header too small"));
    }
    let nrva = u32_at(data, opt + nrva_off).ok_or_else(trunc)? as usize;
    let security_dir_va = if nrva > DIRECTORY_SECURITY {
        u32_at(data, opt + dirs_off + DIRECTORY_SECURITY * 8).ok_or_else(trunc)?
    } else {
        0
    };
    let table = opt + size_of_optional;
    let mut sections = Vec::with_capacity(nsections);
    for i in 0..nsections {
        let h = table + i * SECTION_HEADER_SIZE;
        let raw = data.get(h..h + SECTION_HEADER_SIZE).ok_or_else(|| bad("truncated section table"))?;
        let name_bytes = &raw[0..8];
        let end = name_bytes.iter().position(|&b| b == 0).unwrap_or(8);
        sections.push(SectionHeader {
            name: String::from_utf8_lossy(&name_bytes[..end]).into_owned(),
            virtual_size: u32_at(raw, 8).unwrap_or(0),
            virtual_address: u32_at(raw, 12).unwrap_or(0),
            size_of_raw_data: u32_at(raw, 16).unwrap_or(0),
            pointer_to_raw_data: u32_at(raw, 20).unwrap_or(0),
            characteristics: u32_at(raw, 36).unwrap_or(0),
        });
    }
    Ok(PeInfo {
        machine,
        pe32_plus,
        section_alignment: u32_at(data, opt + 32).ok_or_else(trunc)?,
        file_alignment: u32_at(data, opt + 36).ok_or_else(trunc)?,
        size_of_image: u32_at(data, opt + 56).ok_or_else(trunc)?,
        size_of_headers: u32_at(data, opt + 60).ok_or_else(trunc)?,
        size_of_initialized_data: u32_at(data, opt + 8).ok_or_else(trunc)?,
        checksum: u32_at(data, opt + 64).ok_or_else(trunc)?,
        dll_characteristics: u16_at(data, opt + 70).ok_or_else(trunc)?,
        sections,
        coff,
        opt,
        table,
        pointer_to_symbol_table,
        number_of_symbols,
        security_dir_va,
    })
}

/// `SizeOfImage` of a kernel that is itself a PE image (arm64/riscv64 `Image`, x86 `bzImage`).
pub fn size_of_image(data: &[u8]) -> Option<u32> {
    parse(data, std::path::Path::new("")).ok().map(|i| i.size_of_image)
}

fn write_header(d: &mut [u8], at: usize, s: &SectionHeader) {
    let mut name = [0u8; 8];
    name[..s.name.len()].copy_from_slice(s.name.as_bytes());
    d[at..at + 8].copy_from_slice(&name);
    put_u32(d, at + 8, s.virtual_size);
    put_u32(d, at + 12, s.virtual_address);
    put_u32(d, at + 16, s.size_of_raw_data);
    put_u32(d, at + 20, s.pointer_to_raw_data);
    d[at + 24..at + 36].fill(0);
    put_u32(d, at + 36, s.characteristics);
}

/// Appends `sections` to the stub, in order, laid out as ukify does (see the module docs).
pub fn add_sections(stub: &[u8], stub_path: &std::path::Path, sections: &[NewSection]) -> Result<Vec<u8>, PeError> {
    let info = parse(stub, stub_path)?;
    if info.security_dir_va != 0 {
        return Err(PeError::Signed { path: stub_path.to_owned() });
    }
    let mut data = stub.to_vec();
    let fa = u64::from(info.file_alignment.max(1));
    let sa = u64::from(info.section_alignment.max(1));

    // A symbol table at the very end of the file is dead weight and would sit between the stub's
    // sections and ours.
    if info.pointer_to_symbol_table != 0 {
        let symtab = info.pointer_to_symbol_table as usize;
        let strtab = symtab + info.number_of_symbols as usize * SYMBOL_SIZE;
        if let Some(strsize) = u32_at(&data, strtab)
            && strtab + strsize as usize == data.len()
        {
            data.truncate(symtab);
            put_u32(&mut data, info.coff + 8, 0);
            put_u32(&mut data, info.coff + 12, 0);
            let ch = u16_at(&data, info.coff + 18).unwrap_or(0) | IMAGE_FILE_LOCAL_SYMS_STRIPPED;
            put_u16(&mut data, info.coff + 18, ch);
        }
    }

    // Old (gnu-efi objcopy'd) stubs can have unaligned raw data; pad them to FileAlignment.
    let mut headers = info.sections.clone();
    for i in 0..headers.len() {
        let oldp = headers[i].pointer_to_raw_data as u64;
        let oldsz = headers[i].size_of_raw_data as u64;
        let newp = round_up(oldp, fa);
        let newsz = round_up(oldsz, fa);
        let padp = newp - oldp;
        let padsz = newsz - oldsz;
        if padp == 0 && padsz == 0 {
            continue;
        }
        headers[i].pointer_to_raw_data = newp as u32;
        headers[i].size_of_raw_data = newsz as u32;
        for later in headers.iter_mut().skip(i + 1) {
            later.pointer_to_raw_data += (padp + padsz) as u32;
        }
        let (oldp, oldsz) = (oldp as usize, oldsz as usize);
        let mut rebuilt = Vec::with_capacity(data.len() + (padp + padsz) as usize);
        rebuilt.extend_from_slice(&data[..oldp.min(data.len())]);
        rebuilt.resize(rebuilt.len() + padp as usize, 0);
        rebuilt.extend_from_slice(data.get(oldp..(oldp + oldsz).min(data.len())).unwrap_or(&[]));
        rebuilt.resize(rebuilt.len() + padsz as usize, 0);
        rebuilt.extend_from_slice(data.get(oldp + oldsz..).unwrap_or(&[]));
        data = rebuilt;
    }
    let size_of_headers = round_up(u64::from(info.size_of_headers), fa) as u32;
    put_u32(&mut data, info.opt + 60, size_of_headers);

    let mut size_of_initialized_data = info.size_of_initialized_data;
    let total: usize = sections.iter().map(|s| s.data.len() + fa as usize).sum();
    data.reserve(total);
    for section in sections {
        let name = &section.name;
        if name.is_empty() || name.len() > 8 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(PeError::BadSectionName { name: name.clone() });
        }
        // The new header must end inside SizeOfHeaders (ukify: offset + sizeof > SizeOfHeaders).
        let slot = info.table + headers.len() * SECTION_HEADER_SIZE;
        if slot + SECTION_HEADER_SIZE > size_of_headers as usize {
            return Err(PeError::NoHeaderSpace { path: stub_path.to_owned(), section: name.clone() });
        }
        let too_large = || PeError::TooLarge { name: name.clone() };
        let last = headers.last();
        let va = round_up(last.map_or(u64::from(size_of_headers), |l| u64::from(l.virtual_address) + u64::from(l.virtual_size)), sa);
        let ptr = round_up(data.len() as u64, fa);
        let raw = round_up(section.data.len() as u64, fa);
        let vsize = section.virtual_size.map_or(section.data.len() as u64, u64::from);
        if va + vsize > u64::from(u32::MAX) || ptr + raw > u64::from(u32::MAX) {
            return Err(too_large());
        }
        let header = SectionHeader {
            name: name.clone(),
            virtual_size: vsize as u32,
            virtual_address: va as u32,
            size_of_raw_data: raw as u32,
            pointer_to_raw_data: ptr as u32,
            characteristics: IMAGE_SCN_MEM_READ
                | if name == ".linux" { IMAGE_SCN_CNT_CODE } else { IMAGE_SCN_CNT_INITIALIZED_DATA },
        };
        if name == ".linux"
            && let Ok(kernel) = parse(&section.data, stub_path)
            && kernel.dll_characteristics & IMAGE_DLLCHARACTERISTICS_NX_COMPAT == 0
        {
            let dll = u16_at(&data, info.opt + 70).unwrap_or(0) & !IMAGE_DLLCHARACTERISTICS_NX_COMPAT;
            put_u16(&mut data, info.opt + 70, dll);
        }
        data.resize(ptr as usize, 0);
        data.extend_from_slice(&section.data);
        data.resize((ptr + raw) as usize, 0);
        size_of_initialized_data = size_of_initialized_data.wrapping_add(header.virtual_size);
        headers.push(header);
    }

    for (i, h) in headers.iter().enumerate() {
        write_header(&mut data, info.table + i * SECTION_HEADER_SIZE, h);
    }
    put_u16(&mut data, info.coff + 2, headers.len() as u16);
    put_u32(&mut data, info.opt + 8, size_of_initialized_data);
    put_u32(&mut data, info.opt + 64, 0);
    let last = headers.last().map_or(0, |l| u64::from(l.virtual_address) + u64::from(l.virtual_size));
    put_u32(&mut data, info.opt + 56, round_up(last, sa) as u32);
    Ok(data)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    /// A small but well-formed PE32+ image like a systemd-stub: `.text` and `.data`, 4 KiB section
    /// alignment, 512-byte file alignment, room for more section headers.
    pub fn fake_stub() -> Vec<u8> {
        let mut d = vec![0u8; 0x400];
        d[0..2].copy_from_slice(b"MZ");
        put_u32(&mut d, 0x3c, 0x80);
        d[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        put_u16(&mut d, coff, 0xaa64);
        put_u16(&mut d, coff + 2, 2);
        put_u16(&mut d, coff + 16, 240);
        put_u16(&mut d, coff + 18, 0x0206);
        let opt = coff + 20;
        put_u16(&mut d, opt, 0x20b);
        put_u32(&mut d, opt + 8, 0x200);
        put_u32(&mut d, opt + 32, 0x1000);
        put_u32(&mut d, opt + 36, 0x200);
        put_u32(&mut d, opt + 56, 0x3000);
        put_u32(&mut d, opt + 60, 0x3f0); // unaligned on purpose: ukify rounds it up
        put_u32(&mut d, opt + 64, 0xdead);
        put_u32(&mut d, opt + 108, 16);
        let table = opt + 240;
        write_header(&mut d, table, &SectionHeader {
            name: ".text".into(),
            virtual_size: 0x180,
            virtual_address: 0x1000,
            size_of_raw_data: 0x180, // unaligned raw size, as in gnu-efi stubs
            pointer_to_raw_data: 0x400,
            characteristics: 0x6000_0020,
        });
        write_header(&mut d, table + 40, &SectionHeader {
            name: ".data".into(),
            virtual_size: 0x100,
            virtual_address: 0x2000,
            size_of_raw_data: 0x100,
            pointer_to_raw_data: 0x580,
            characteristics: 0xc000_0040,
        });
        d.extend(std::iter::repeat_n(0x90, 0x180));
        d.extend(std::iter::repeat_n(0x11, 0x100));
        d
    }

    /// The invariants every UKI must satisfy, whoever wrote it.
    pub fn check_layout(uki: &[u8]) -> PeInfo {
        let info = parse(uki, Path::new("uki")).unwrap();
        let fa = info.file_alignment;
        let sa = info.section_alignment;
        assert_eq!(info.size_of_headers % fa, 0, "SizeOfHeaders aligned");
        let mut prev_end = 0u64;
        for s in &info.sections {
            assert_eq!(s.virtual_address % sa, 0, "{} VMA aligned", s.name);
            assert!(u64::from(s.virtual_address) >= prev_end, "{} overlaps the previous section", s.name);
            prev_end = u64::from(s.virtual_address) + u64::from(s.virtual_size);
            assert_eq!(s.pointer_to_raw_data % fa, 0, "{} file offset aligned", s.name);
            assert_eq!(s.size_of_raw_data % fa, 0, "{} raw size aligned", s.name);
            assert!((s.pointer_to_raw_data + s.size_of_raw_data) as usize <= uki.len(), "{} inside the file", s.name);
        }
        assert_eq!(u64::from(info.size_of_image), round_up(prev_end, u64::from(sa)), "SizeOfImage");
        info
    }

    #[test]
    fn sections_are_appended_aligned_and_in_order() {
        let stub = fake_stub();
        let kernel = vec![0x4d; 10_000];
        let sections = vec![
            NewSection { name: ".osrel".into(), data: b"ID=dbh\n".to_vec(), virtual_size: None },
            NewSection { name: ".cmdline".into(), data: b"root=LABEL=dbh-root".to_vec(), virtual_size: None },
            NewSection { name: ".uname".into(), data: b"6.1.0-test".to_vec(), virtual_size: None },
            NewSection { name: ".initrd".into(), data: vec![7; 5000], virtual_size: None },
            NewSection { name: ".linux".into(), data: kernel.clone(), virtual_size: Some(0x8000) },
        ];
        let uki = add_sections(&stub, Path::new("stub"), &sections).unwrap();
        let info = check_layout(&uki);
        let names: Vec<_> = info.sections.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, [".text", ".data", ".osrel", ".cmdline", ".uname", ".initrd", ".linux"]);
        // The stub's unaligned .text grew to 0x200 and pushed .data to 0x600.
        assert_eq!(info.sections[0].size_of_raw_data, 0x200);
        assert_eq!(info.sections[1].pointer_to_raw_data, 0x600);
        assert!(uki[0x600..0x700].iter().all(|&b| b == 0x11), ".data moved intact");
        assert_eq!(info.size_of_headers, 0x400);
        // First new section right after the stub's image.
        assert_eq!(info.sections[2].virtual_address, 0x3000);
        assert_eq!(info.sections[3].virtual_address, 0x4000);
        let linux = &info.sections[6];
        assert_eq!(linux.virtual_size, 0x8000);
        assert_eq!(linux.characteristics, IMAGE_SCN_MEM_READ | IMAGE_SCN_CNT_CODE);
        assert_eq!(info.sections[5].characteristics, IMAGE_SCN_MEM_READ | IMAGE_SCN_CNT_INITIALIZED_DATA);
        assert_eq!(info.size_of_image, linux.virtual_address + 0x8000);
        assert_eq!(info.checksum, 0);
        assert_eq!(info.size_of_initialized_data, 0x200 + 7 + 19 + 10 + 5000 + 0x8000);
        // Raw data is padded to FileAlignment; the kernel's bytes come first.
        assert!(info.section_data(&uki, ".linux").unwrap().starts_with(&kernel), ".linux holds the kernel");
        assert_eq!(info.section_data(&uki, ".cmdline").unwrap(), b"root=LABEL=dbh-root");
    }

    #[test]
    fn signed_or_garbage_stubs_are_refused() {
        let mut stub = fake_stub();
        let opt = 0x84 + 20;
        put_u32(&mut stub, opt + 112 + DIRECTORY_SECURITY * 8, 0x5000);
        let err = add_sections(&stub, Path::new("s.efi"), &[]).unwrap_err();
        assert!(matches!(err, PeError::Signed { .. }), "{err}");
        let err = add_sections(b"not a PE at all", Path::new("x"), &[]).unwrap_err();
        assert_eq!(err.to_string(), "x is not a PE image: no MZ signature");
    }

    #[test]
    fn header_space_runs_out_with_a_clear_error() {
        let stub = fake_stub();
        let many: Vec<_> =
            (0..20).map(|i| NewSection { name: format!(".s{i}"), data: vec![1], virtual_size: None }).collect();
        let err = add_sections(&stub, Path::new("stub"), &many).unwrap_err();
        assert!(matches!(err, PeError::NoHeaderSpace { .. }), "{err}");
    }
}
