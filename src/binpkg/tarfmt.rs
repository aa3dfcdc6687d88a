//! The outer tar container of a GPKG: a strict header reader that records where each member's
//! data lies (so members are read or copied by offset, never by reading the whole file), and a
//! writer of deterministic ustar headers (GNU long names when a name does not fit).

use std::io::{self, Read, Write};

use super::Fault;

pub const BLOCK: u64 = 512;

/// Random-access bytes: a file (positional reads, no shared cursor) or a slice (fuzzing, tests).
pub trait Source {
    fn len(&self) -> u64;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;

    /// Fills `buf` from `offset`; `Ok(false)` if the source ends first.
    fn read_exact_at(&self, mut offset: u64, mut buf: &mut [u8]) -> io::Result<bool> {
        while !buf.is_empty() {
            match self.read_at(offset, buf) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    offset += n as u64;
                    buf = &mut buf[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

impl Source for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(<[u8]>::len(self));
        let n = buf.len().min(<[u8]>::len(self) - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

/// A file opened for positional reads; its length is taken once, at open.
pub struct FileSource {
    file: std::fs::File,
    len: u64,
}

impl FileSource {
    pub fn new(file: std::fs::File) -> io::Result<FileSource> {
        let len = file.metadata()?.len();
        Ok(FileSource { file, len })
    }
}

impl Source for FileSource {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let max = self.len.saturating_sub(offset);
        let n = buf.len().min(usize::try_from(max).unwrap_or(usize::MAX));
        self.file.read_at(&mut buf[..n], offset)
    }
}

/// A `Read` over one byte range of a source; ending early is an `UnexpectedEof` error.
pub struct Section<'a, S: Source + ?Sized> {
    src: &'a S,
    pos: u64,
    end: u64,
}

impl<'a, S: Source + ?Sized> Section<'a, S> {
    pub fn new(src: &'a S, offset: u64, len: u64) -> Self {
        Section { src, pos: offset, end: offset.saturating_add(len) }
    }
}

impl<S: Source + ?Sized> Read for Section<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end - self.pos;
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.src.read_at(self.pos, &mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file ends inside a member"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// One member of the container, as found in its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Full name inside the container (`hello-1.0-1/metadata.tar.zst`).
    pub name: String,
    pub size: u64,
    /// Where the data starts in the container.
    pub offset: u64,
    pub mtime: u64,
    /// The tar type flag (`b'0'` for a regular file).
    pub kind: u8,
}

fn octal(field: &[u8], what: &str, at: u64) -> Result<u64, Fault> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        // GNU base-256: big-endian two's complement; only non-negative values make sense here.
        if field[0] & 0x40 != 0 {
            return Err(Fault::bad(format!("tar header at offset {at} has a negative {what}")));
        }
        let mut v: u64 = u64::from(field[0] & 0x3f);
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(b)))
                .ok_or_else(|| Fault::bad(format!("tar header at offset {at} has a {what} that is too large")))?;
        }
        return Ok(v);
    }
    let text: Vec<u8> = field.iter().copied().take_while(|&b| b != 0).collect();
    let text = std::str::from_utf8(&text).map_err(|_| Fault::bad(format!("tar header at offset {at} has a garbled {what}")))?;
    let text = text.trim_matches(' ');
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).map_err(|_| Fault::bad(format!("tar header at offset {at} has a garbled {what} `{text}`")))
}

/// The ustar checksum: all header bytes summed with the checksum field counted as spaces.
fn header_sum(h: &[u8; BLOCK as usize]) -> u64 {
    let mut sum: u64 = 8 * u64::from(b' ');
    for (i, &b) in h.iter().enumerate() {
        if !(148..156).contains(&i) {
            sum += u64::from(b);
        }
    }
    sum
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

fn utf8(bytes: &[u8], at: u64) -> Result<String, Fault> {
    String::from_utf8(bytes.to_vec()).map_err(|_| Fault::bad(format!("tar member name at offset {at} is not UTF-8")))
}

/// Longest name/pax record dbh accepts; real GPKG member names are short.
const MAX_LONG_NAME: u64 = 64 * 1024;

/// Lists the container's members. Stops at the end-of-archive block, or cleanly at the end of the
/// source after a complete member (Portage accepts a GPKG whose trailing zero blocks were cut).
pub fn list<S: Source + ?Sized>(src: &S) -> Result<Vec<Entry>, Fault> {
    let len = src.len();
    let mut entries = Vec::new();
    let mut pos = 0u64;
    let mut long_name: Option<String> = None;
    let mut pax_path: Option<String> = None;
    let mut pax_size: Option<u64> = None;
    loop {
        if pos == len {
            if long_name.is_some() || pax_path.is_some() || pax_size.is_some() {
                return Err(Fault::truncated("after an extended header"));
            }
            break;
        }
        let mut h = [0u8; BLOCK as usize];
        if len - pos < BLOCK || !src.read_exact_at(pos, &mut h).map_err(Fault::Io)? {
            return Err(Fault::truncated(&format!("inside the tar header at offset {pos}")));
        }
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let stored = octal(&h[148..156], "checksum", pos).ok();
        let sum = header_sum(&h);
        if stored != Some(sum) {
            return Err(Fault::bad(format!("tar header at offset {pos} has a wrong checksum (not a tar file?)")));
        }
        let size = octal(&h[124..136], "size", pos)?;
        let mtime = octal(&h[136..148], "mtime", pos)?;
        let kind = h[156];
        let data = pos + BLOCK;
        let padded = size.checked_add(BLOCK - 1).map(|s| s / BLOCK * BLOCK);
        let next = padded.and_then(|p| data.checked_add(p));
        let Some(next) = next else {
            return Err(Fault::bad(format!("tar header at offset {pos} has an impossible size {size}")));
        };
        if data.checked_add(size).is_none_or(|end| end > len) {
            return Err(Fault::truncated(&format!("inside member data at offset {data} ({size} bytes announced)")));
        }
        match kind {
            b'L' | b'x' | b'g' | b'K' => {
                if size > MAX_LONG_NAME {
                    return Err(Fault::bad(format!("extended tar header at offset {pos} is {size} bytes long")));
                }
                let mut buf = vec![0u8; size as usize];
                if !src.read_exact_at(data, &mut buf).map_err(Fault::Io)? {
                    return Err(Fault::truncated("inside an extended header"));
                }
                match kind {
                    b'L' => long_name = Some(utf8(cstr(&buf), pos)?),
                    b'x' => {
                        for (key, value) in pax_records(&buf, pos)? {
                            match key.as_str() {
                                "path" => pax_path = Some(value),
                                "size" => {
                                    pax_size = Some(value.parse().map_err(|_| {
                                        Fault::bad(format!("pax header at offset {pos} has a garbled size"))
                                    })?)
                                }
                                _ => {}
                            }
                        }
                    }
                    _ => {} // global pax headers and GNU long link names do not concern members here
                }
                pos = next;
                continue;
            }
            _ => {}
        }
        let magic = &h[257..265];
        let name = if let Some(n) = pax_path.take().or(long_name.take()) {
            n
        } else {
            let base = cstr(&h[..100]);
            let prefix = cstr(&h[345..500]);
            // Only POSIX ustar uses the prefix field; old GNU headers keep other data there.
            if &magic[..6] == b"ustar\0" && !prefix.is_empty() {
                let mut full = prefix.to_vec();
                full.push(b'/');
                full.extend_from_slice(base);
                utf8(&full, pos)?
            } else {
                utf8(base, pos)?
            }
        };
        let (size, next) = match pax_size.take() {
            Some(s) if s != size => {
                let padded = s.checked_add(BLOCK - 1).map(|p| p / BLOCK * BLOCK);
                match padded.and_then(|p| data.checked_add(p)) {
                    Some(n) if data + s <= len => (s, n),
                    _ => return Err(Fault::truncated(&format!("inside member data at offset {data}"))),
                }
            }
            _ => (size, next),
        };
        entries.push(Entry { name, size, offset: data, mtime, kind: if kind == 0 { b'0' } else { kind } });
        pos = next.min(len);
    }
    Ok(entries)
}

fn pax_records(buf: &[u8], at: u64) -> Result<Vec<(String, String)>, Fault> {
    let bad = || Fault::bad(format!("pax header at offset {at} is garbled"));
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() && rest[0] != 0 {
        let sp = rest.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let n: usize = std::str::from_utf8(&rest[..sp]).ok().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        if n <= sp + 1 || n > rest.len() || rest[n - 1] != b'\n' {
            return Err(bad());
        }
        let record = &rest[sp + 1..n - 1];
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        let key = String::from_utf8(record[..eq].to_vec()).map_err(|_| bad())?;
        let value = String::from_utf8(record[eq + 1..].to_vec()).map_err(|_| bad())?;
        out.push((key, value));
        rest = &rest[n..];
    }
    Ok(out)
}

/// Largest size an 11-digit octal field holds; larger sizes use GNU base-256.
const OCTAL_MAX: u64 = 0o777_7777_7777;

fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(text.as_bytes());
    field[digits] = 0;
}

fn header(name: &[u8], size: u64, mtime: u64, kind: u8, gnu: bool) -> [u8; BLOCK as usize] {
    let mut h = [0u8; BLOCK as usize];
    h[..name.len()].copy_from_slice(name);
    put_octal(&mut h[100..108], 0o644);
    put_octal(&mut h[108..116], 0);
    put_octal(&mut h[116..124], 0);
    if size > OCTAL_MAX {
        h[124] = 0x80;
        for (i, b) in size.to_be_bytes().iter().enumerate() {
            h[128 + i] = *b;
        }
    } else {
        put_octal(&mut h[124..136], size);
    }
    put_octal(&mut h[136..148], mtime.min(OCTAL_MAX));
    h[156] = kind;
    if gnu {
        h[257..265].copy_from_slice(b"ustar  \0");
    } else {
        h[257..265].copy_from_slice(b"ustar\x0000");
    }
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    // Like Python's tarfile: six octal digits, NUL, space.
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
    h
}

/// Writes a container member by member with fixed owner (0/0, no names) and mode 0644, so the
/// same input always gives the same bytes. Names that do not fit ustar get a GNU long-name header.
pub struct Writer<W: Write> {
    out: W,
    written: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer { out, written: 0 }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = self.written % BLOCK;
        if rem != 0 {
            let zeros = [0u8; BLOCK as usize];
            self.put(&zeros[..(BLOCK - rem) as usize])?;
        }
        Ok(())
    }

    /// Writes the header for a member of `size` bytes; the caller then writes exactly `size` bytes
    /// with [`Writer::data`] and calls [`Writer::finish_member`].
    pub fn begin(&mut self, name: &str, size: u64, mtime: u64) -> io::Result<()> {
        let bytes = name.as_bytes();
        let gnu = size > OCTAL_MAX;
        if bytes.len() <= 100 {
            let h = header(bytes, size, mtime, b'0', gnu);
            return self.put(&h);
        }
        if let Some(split) = ustar_split(bytes) {
            let (prefix, base) = (&bytes[..split], &bytes[split + 1..]);
            let mut h = header(base, size, mtime, b'0', false);
            if !gnu {
                h[345..345 + prefix.len()].copy_from_slice(prefix);
                h[148..156].fill(b' ');
                let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
                h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
                return self.put(&h);
            }
        }
        let mut long = bytes.to_vec();
        long.push(0);
        let lh = header(b"././@LongLink", long.len() as u64, 0, b'L', true);
        self.put(&lh)?;
        self.put(&long)?;
        self.pad()?;
        let h = header(&bytes[..100], size, mtime, b'0', true);
        self.put(&h)
    }

    pub fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.put(bytes)
    }

    pub fn finish_member(&mut self) -> io::Result<()> {
        self.pad()
    }

    pub fn member(&mut self, name: &str, data: &[u8], mtime: u64) -> io::Result<()> {
        self.begin(name, data.len() as u64, mtime)?;
        self.data(data)?;
        self.finish_member()
    }

    /// Writes the two zero blocks and pads to a multiple of 10 KiB like GNU tar and Python do.
    pub fn finish(mut self) -> io::Result<W> {
        let zeros = [0u8; BLOCK as usize];
        self.put(&zeros)?;
        self.put(&zeros)?;
        let record = 20 * BLOCK;
        while !self.written.is_multiple_of(record) {
            self.put(&zeros)?;
        }
        Ok(self.out)
    }
}

/// Where to split a long name into ustar prefix (≤155) and name (≤100), if possible.
fn ustar_split(name: &[u8]) -> Option<usize> {
    if name.len() > 256 {
        return None;
    }
    name.iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'/' && i <= 155 && name.len() - i - 1 <= 100 && i > 0)
        .map(|(i, _)| i)
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_headers_read_back() {
        let mut w = Writer::new(Vec::new());
        w.member("p-1/gpkg-1", b"", 7).unwrap();
        let long = format!("{}/metadata.tar.zst", "x".repeat(140));
        w.member(&long, b"abc", 7).unwrap();
        let longer = format!("{}/image.tar.zst", "y".repeat(200));
        w.member(&longer, b"defg", 9).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 10240, 0);
        let e = list(&bytes[..]).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].name, "p-1/gpkg-1");
        assert_eq!(e[1].name, long);
        assert_eq!(e[2].name, longer);
        assert_eq!(&bytes[e[2].offset as usize..][..4], b"defg");
        // Another tar implementation reads what we write.
        let mut ar = tar::Archive::new(&bytes[..]);
        let names: Vec<String> =
            ar.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        assert_eq!(names, vec!["p-1/gpkg-1".to_string(), long, longer]);
    }

    #[test]
    fn base256_sizes_parse() {
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[4..].copy_from_slice(&(9u64 << 32).to_be_bytes());
        assert_eq!(octal(&f, "size", 0).unwrap(), 9u64 << 32);
    }
}
