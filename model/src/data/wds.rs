//! webdataset tar shards (`wds:data/shard-{000..009}.tar`): each sample is the group of tar
//! members sharing a key (the member name up to the first dot of its basename), with one image
//! member (`jpg`, `jpeg`, `png`, `webp`) and a `txt` caption.
//!
//! Open scans only the tar headers (seeking over member data) and records where each member's
//! bytes lie, so the source is indexable like the others: `get(i)` seeks and reads two members.
//! Samples lacking an image or caption, and those cut off by a truncated shard, are skipped at
//! open and counted; a shard that is missing or not a tar at all is an error.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::Path;

use super::{Sample, Source};

/// Most names one pattern may expand to: a typo like `{0..99999999}` is an error, not an OOM.
const MAX_EXPANSION: usize = 1 << 20;

/// Expands bash-style braces: comma lists `{a,b}` and numeric ranges `{000..009}` (descending
/// too, zero-padded to the wider bound when a bound has a leading zero, as bash does), nested
/// and repeated. A pattern without braces is itself.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    expand_into(pattern, &mut out)?;
    Ok(out)
}

fn expand_into(pattern: &str, out: &mut Vec<String>) -> Result<(), String> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err(format!("{pattern:?}: '}}' without '{{'"));
        }
        if out.len() >= MAX_EXPANSION {
            return Err(format!("brace pattern expands to more than {MAX_EXPANSION} names"));
        }
        out.push(pattern.to_string());
        return Ok(());
    };
    if pattern[..open].contains('}') {
        return Err(format!("{pattern:?}: '}}' without '{{'"));
    }
    // The matching '}' and the top-level commas between.
    let (mut depth, mut close, mut commas) = (0usize, None, Vec::new());
    for (j, c) in pattern[open..].char_indices() {
        let j = open + j;
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(j);
                    break;
                }
            }
            ',' if depth == 1 => commas.push(j),
            _ => {}
        }
    }
    let close = close.ok_or_else(|| format!("{pattern:?}: '{{' without '}}'"))?;
    let (prefix, inner, suffix) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let alternatives: Vec<String> = if commas.is_empty() {
        range(inner).ok_or_else(|| {
            format!("{pattern:?}: {{{inner}}} is neither a list {{a,b}} nor a numeric range {{000..009}}")
        })??
    } else {
        let mut start = open + 1;
        let mut alts = Vec::new();
        for &c in commas.iter().chain(std::iter::once(&close)) {
            alts.push(pattern[start..c].to_string());
            start = c + 1;
        }
        alts
    };
    for alt in alternatives {
        // The prefix has no braces; the alternative and the suffix may: expand the whole again.
        expand_into(&format!("{prefix}{alt}{suffix}"), out)?;
    }
    Ok(())
}

/// `Some(numbers)` when `inner` is `A..B` with integer bounds, `None` when it is not a range.
fn range(inner: &str) -> Option<Result<Vec<String>, String>> {
    let (a, b) = inner.split_once("..")?;
    let digits = |s: &str| {
        let d = s.strip_prefix('-').unwrap_or(s);
        !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit())
    };
    if !digits(a) || !digits(b) {
        return None;
    }
    let (Ok(x), Ok(y)) = (a.parse::<i64>(), b.parse::<i64>()) else {
        return Some(Err(format!("{{{inner}}}: range bound out of range")));
    };
    if x.abs_diff(y) >= MAX_EXPANSION as u64 {
        return Some(Err(format!("{{{inner}}}: range has more than {MAX_EXPANSION} numbers")));
    }
    let padded = |s: &str| {
        let d = s.strip_prefix('-').unwrap_or(s);
        d.len() > 1 && d.starts_with('0')
    };
    let width = if padded(a) || padded(b) { a.len().max(b.len()) } else { 0 };
    let numbers: Vec<i64> = if x <= y { (x..=y).collect() } else { (y..=x).rev().collect() };
    Some(Ok(numbers.into_iter().map(|n| format!("{n:0width$}")).collect()))
}

/// Where one member's bytes lie in its shard.
#[derive(Clone, Copy, Debug)]
struct Member {
    pos: u64,
    size: u64,
}

/// One sample: its shard, key, and image and caption members.
#[derive(Clone, Debug)]
struct Entry {
    shard: usize,
    key: String,
    image: Member,
    txt: Member,
}

/// Image extensions a sample may use (webdataset's names).
const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// The samples of a set of shards, by position.
pub struct WdsSource {
    shards: Vec<String>,
    samples: Vec<Entry>,
    /// Keys without both an image and a caption, including those cut off by truncation.
    skipped: usize,
    /// Shards that end before their last member's data does (or in a broken header).
    truncated: usize,
}

/// Members of one key while scanning a shard.
#[derive(Default)]
struct Group {
    image: Option<Member>,
    txt: Option<Member>,
}

/// What one shard holds: complete samples (key, image, txt), incomplete keys, whether truncated.
struct ShardScan {
    samples: Vec<(String, Member, Member)>,
    skipped: usize,
    truncated: bool,
}

/// Reads the headers of `shard` (not the member data).
fn scan_shard(shard: &str) -> Result<ShardScan, String> {
    let file = File::open(shard).map_err(|e| format!("wds: shard {shard}: {e}"))?;
    let file_len = file.metadata().map_err(|e| format!("wds: shard {shard}: {e}"))?.len();
    let mut archive = tar::Archive::new(file);
    let entries = archive.entries_with_seek().map_err(|e| format!("wds: shard {shard}: {e}"))?;
    // Groups in the order their keys first appear.
    let mut order: Vec<String> = Vec::new();
    let mut groups: HashMap<String, Group> = HashMap::new();
    let mut truncated = false;
    for (index, entry) in entries.enumerate() {
        let entry = match entry {
            Ok(entry) => entry,
            // Garbage where the first header should be: not a tar. Later: a truncated shard.
            Err(e) if index == 0 => return Err(format!("wds: shard {shard} is not a tar archive: {e}")),
            Err(_) => {
                truncated = true;
                break;
            }
        };
        let member = Member { pos: entry.raw_file_position(), size: entry.size() };
        let name = entry.path_bytes();
        let name = String::from_utf8_lossy(&name);
        // webdataset: key = path up to the first dot of the basename; the rest is the extension.
        let base_start = name.rfind('/').map_or(0, |s| s + 1);
        let Some(dot) = name[base_start..].find('.').map(|d| base_start + d) else { continue };
        let (key, ext) = (&name[..dot], name[dot + 1..].to_ascii_lowercase());
        let past_end = member.pos.checked_add(member.size).is_none_or(|end| end > file_len);
        if past_end {
            // The shard was cut inside this member's data: its key is incomplete (counted below
            // if it has no other members), and nothing after it can be read.
            truncated = true;
            if !groups.contains_key(key) {
                order.push(key.to_string());
                groups.insert(key.to_string(), Group::default());
            }
            break;
        }
        if !entry.header().entry_type().is_file() || dot == base_start {
            continue;
        }
        let is_image = IMAGE_EXTENSIONS.contains(&ext.as_str());
        if !is_image && ext != "txt" {
            continue;
        }
        let group = groups.entry(key.to_string()).or_insert_with(|| {
            order.push(key.to_string());
            Group::default()
        });
        if is_image {
            group.image.get_or_insert(member);
        } else {
            group.txt.get_or_insert(member);
        }
    }
    let mut scan = ShardScan { samples: Vec::new(), skipped: 0, truncated };
    for key in order {
        match groups.remove(&key) {
            Some(Group { image: Some(image), txt: Some(txt) }) => scan.samples.push((key, image, txt)),
            _ => scan.skipped += 1,
        }
    }
    Ok(scan)
}

impl WdsSource {
    /// Expands `shards` and scans every shard's headers.
    pub fn open(shards: &str) -> Result<WdsSource, String> {
        let names = expand_braces(shards).map_err(|e| format!("wds: {e}"))?;
        let mut source = WdsSource { shards: Vec::new(), samples: Vec::new(), skipped: 0, truncated: 0 };
        for (s, name) in names.into_iter().enumerate() {
            let scan = scan_shard(&name)?;
            source.skipped += scan.skipped;
            source.truncated += scan.truncated as usize;
            source.samples.extend(scan.samples.into_iter().map(|(key, image, txt)| Entry {
                shard: s,
                key,
                image,
                txt,
            }));
            source.shards.push(name);
        }
        Ok(source)
    }

    /// Samples skipped at open (no image or no caption, or cut off by truncation).
    pub fn skipped(&self) -> usize {
        self.skipped
    }
}

/// Exactly `member.size` bytes at `member.pos` of an open shard.
fn read_member(file: &mut File, member: Member) -> std::io::Result<Vec<u8>> {
    file.seek(SeekFrom::Start(member.pos))?;
    let mut bytes = Vec::new();
    file.take(member.size).read_to_end(&mut bytes)?;
    if bytes.len() as u64 != member.size {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "shard is shorter than at open"));
    }
    Ok(bytes)
}

impl Source for WdsSource {
    fn describe(&self) -> String {
        let truncated = if self.truncated > 0 { format!(", {} truncated", self.truncated) } else { String::new() };
        format!(
            "wds ({} shards, {} samples, {} skipped{truncated})",
            self.shards.len(),
            self.samples.len(),
            self.skipped
        )
    }

    fn len(&self) -> usize {
        self.samples.len()
    }

    /// The samples lie shard after shard (`open` appends each shard's).
    fn shards(&self) -> Option<Vec<Range<usize>>> {
        let mut counts = vec![0; self.shards.len()];
        self.samples.iter().for_each(|e| counts[e.shard] += 1);
        let mut end = 0;
        Some(
            counts
                .into_iter()
                .map(|n| {
                    end += n;
                    end - n..end
                })
                .collect(),
        )
    }

    fn get(&self, i: usize) -> Result<Sample, String> {
        let entry = self.samples.get(i).ok_or_else(|| format!("wds: sample {i} out of range ({})", self.len()))?;
        let shard = &self.shards[entry.shard];
        let key = &entry.key;
        let mut file = File::open(Path::new(shard)).map_err(|e| format!("{shard}: {e}"))?;
        let txt = read_member(&mut file, entry.txt).map_err(|e| format!("{shard}: {key}.txt: {e}"))?;
        let caption = String::from_utf8(txt).map_err(|_| format!("{shard}: {key}.txt: caption is not UTF-8"))?;
        let caption = caption.trim();
        if caption.is_empty() {
            return Err(format!("{shard}: {key}.txt: empty caption"));
        }
        let bytes = read_member(&mut file, entry.image).map_err(|e| format!("{shard}: {key} image: {e}"))?;
        let image = super::decode_image(&bytes).map_err(|e| format!("{shard}: {key} image: {e}"))?;
        Ok(Sample { image, caption: caption.to_string(), label: None })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use image::{DynamicImage, ImageFormat, RgbImage};

    use super::*;

    #[test]
    fn expand_braces_ranges_and_lists() {
        assert_eq!(expand_braces("a.tar").unwrap(), ["a.tar"]);
        assert_eq!(expand_braces("s-{000..002}.tar").unwrap(), ["s-000.tar", "s-001.tar", "s-002.tar"]);
        assert_eq!(expand_braces("s-{8..10}").unwrap(), ["s-8", "s-9", "s-10"]);
        assert_eq!(expand_braces("s-{08..10}").unwrap(), ["s-08", "s-09", "s-10"]);
        assert_eq!(expand_braces("{3..1}").unwrap(), ["3", "2", "1"]);
        assert_eq!(expand_braces("{a,b}/{0..1}").unwrap(), ["a/0", "a/1", "b/0", "b/1"]);
        assert_eq!(expand_braces("x{a,b{1..2},}y").unwrap(), ["xay", "xb1y", "xb2y", "xy"]);
        for bad in ["a{0..2", "a}0", "a{x}b", "{0..9999999999}", "{}"] {
            assert!(expand_braces(bad).is_err(), "{bad}");
        }
    }

    fn png(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
        let mut bytes = Vec::new();
        DynamicImage::ImageRgb8(RgbImage::from_pixel(w, h, image::Rgb(rgb)))
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        bytes
    }

    /// A tar of `members` (name, bytes), in order.
    fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
        let mut builder = tar::Builder::new(File::create(path).unwrap());
        for (name, bytes) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, bytes.as_slice()).unwrap();
        }
        builder.into_inner().unwrap();
    }

    /// Shard `s` with 3 samples `d/s-j` (a (s+1)×(j+1) PNG of colour (10s, 10j, 7), caption
    /// "shard s sample j"), the last with its PNG after its caption.
    fn shard_members(s: usize) -> Vec<(String, Vec<u8>)> {
        let mut members = Vec::new();
        for j in 0..3 {
            let img = (format!("d/{s}-{j}.png"), png(s as u32 + 1, j as u32 + 1, [10 * s as u8, 10 * j as u8, 7]));
            let txt = (format!("d/{s}-{j}.txt"), format!(" shard {s} sample {j}\n").into_bytes());
            if j == 2 {
                members.extend([txt, img]);
            } else {
                members.extend([img, txt]);
            }
        }
        members
    }

    #[test]
    fn reads_samples_across_shards() {
        let dir = tempfile::tempdir().unwrap();
        for s in 0..2 {
            let mut members = shard_members(s);
            // Extra members are ignored; a key without a caption is skipped.
            members.push((format!("d/{s}-0.json"), b"{}".to_vec()));
            members.push((format!("d/{s}-9.png"), png(1, 1, [0, 0, 0])));
            write_tar(&dir.path().join(format!("shard-{s:03}.tar")), &members);
        }
        let pattern = format!("{}/shard-{{000..001}}.tar", dir.path().display());
        let ds = WdsSource::open(&pattern).unwrap();
        assert_eq!(ds.len(), 6);
        assert_eq!(ds.skipped(), 2);
        assert_eq!(ds.describe(), "wds (2 shards, 6 samples, 2 skipped)");
        assert_eq!(ds.shards(), Some(vec![0..3, 3..6]));
        for s in 0..2 {
            for j in 0..3 {
                let sample = ds.get(3 * s + j).unwrap();
                assert_eq!(sample.caption, format!("shard {s} sample {j}"));
                assert_eq!(sample.image.dimensions(), (s as u32 + 1, j as u32 + 1));
                assert_eq!(sample.image.get_pixel(0, 0).0, [10 * s as u8, 10 * j as u8, 7]);
                assert_eq!(sample.label, None);
            }
        }
        assert!(ds.get(6).is_err());
    }

    #[test]
    fn truncated_shard_keeps_earlier_samples() {
        let dir = tempfile::tempdir().unwrap();
        let whole = dir.path().join("whole.tar");
        let members = shard_members(0);
        write_tar(&whole, &members);
        let bytes = std::fs::read(&whole).unwrap();
        // The last member (the PNG of sample 2) starts after 6 header+data blocks; cut 10 bytes into it.
        let blocks: usize = members[..5].iter().map(|(_, b)| 512 + b.len().div_ceil(512) * 512).sum();
        let cut = blocks + 512 + 10;
        assert!(cut < bytes.len() - 1024);
        std::fs::write(dir.path().join("cut.tar"), &bytes[..cut]).unwrap();
        let ds = WdsSource::open(dir.path().join("cut.tar").to_str().unwrap()).unwrap();
        assert_eq!(ds.len(), 2);
        assert!(ds.skipped() > 0);
        assert_eq!(ds.describe(), "wds (1 shards, 2 samples, 1 skipped, 1 truncated)");
        assert_eq!(ds.get(1).unwrap().caption, "shard 0 sample 1");

        // Cut inside a header: the broken header ends the scan too.
        std::fs::write(dir.path().join("cut2.tar"), &bytes[..blocks + 100]).unwrap();
        let ds = WdsSource::open(dir.path().join("cut2.tar").to_str().unwrap()).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.skipped(), 1, "sample 2 has only its caption");
    }

    #[test]
    fn bad_members_are_errors_at_get() {
        let dir = tempfile::tempdir().unwrap();
        let mut webp = Vec::new();
        DynamicImage::ImageRgb8(RgbImage::from_pixel(3, 2, image::Rgb([1, 2, 3])))
            .write_to(&mut Cursor::new(&mut webp), ImageFormat::WebP)
            .unwrap();
        let members = vec![
            ("a.png".to_string(), b"\x89PNG\r\n\x1a\nbroken".to_vec()),
            ("a.txt".to_string(), b"fine".to_vec()),
            ("b.png".to_string(), png(1, 1, [0, 0, 0])),
            ("b.txt".to_string(), b" \n".to_vec()),
            ("c.jpg".to_string(), png(1, 1, [0, 0, 0])),
            ("c.txt".to_string(), vec![0xff, 0xfe]),
            ("e.WEBP".to_string(), webp),
            ("e.TXT".to_string(), b"lossless".to_vec()),
        ];
        write_tar(&dir.path().join("s.tar"), &members);
        let ds = WdsSource::open(dir.path().join("s.tar").to_str().unwrap()).unwrap();
        assert_eq!(ds.len(), 4);
        let err = ds.get(0).unwrap_err();
        assert!(err.contains("s.tar: a image"), "{err}");
        let err = ds.get(1).unwrap_err();
        assert!(err.contains("b.txt: empty caption"), "{err}");
        let err = ds.get(2).unwrap_err();
        assert!(err.contains("c.txt: caption is not UTF-8"), "{err}");
        let e = ds.get(3).unwrap();
        assert_eq!((e.caption.as_str(), e.image.get_pixel(2, 1).0), ("lossless", [1, 2, 3]));
    }

    #[test]
    fn missing_or_non_tar_shard_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        write_tar(&dir.path().join("s-0.tar"), &shard_members(0));
        let pattern = format!("{}/s-{{0..1}}.tar", dir.path().display());
        let err = WdsSource::open(&pattern).err().unwrap();
        assert!(err.contains("s-1.tar"), "{err}");
        std::fs::write(dir.path().join("s-1.tar"), vec![b'x'; 2000]).unwrap();
        let err = WdsSource::open(&pattern).err().unwrap();
        assert!(err.contains("s-1.tar is not a tar archive"), "{err}");
        std::fs::write(dir.path().join("s-1.tar"), png(2, 2, [1, 1, 1])).unwrap();
        let err = WdsSource::open(&pattern).err().unwrap();
        assert!(err.contains("s-1.tar is not a tar archive"), "{err}");
        let err = WdsSource::open(&format!("{}/s-{{0..1.tar", dir.path().display())).err().unwrap();
        assert!(err.contains("without"), "{err}");
    }
}
