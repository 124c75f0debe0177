//! open_clip's `SimpleTokenizer`, rebuilt on the HF `tokenizers` crate from open_clip's own BPE
//! vocabulary (`data/bpe_simple_vocab_16e6.txt.gz`, MIT, shipped with its licence): byte-level
//! BPE with `</w>` word ends, the CLIP split pattern, lower-casing and whitespace cleanup, then
//! SOT … EOT, padded with 0 or truncated to the context length with EOT kept last.
//!
//! open_clip also runs `ftfy.fix_text` and `html.unescape` twice before that. ftfy only changes
//! mis-decoded text (mojibake) and is not reproduced; HTML entities are unescaped here for the
//! numeric forms and the common named ones (&amp; &lt; &gt; &quot; &apos; &#39; &nbsp;).

use std::fmt;
use std::io::Read;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as Normalizers};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizers;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

/// The BPE vocabulary of open_clip (`open_clip/bpe_simple_vocab_16e6.txt.gz`, open_clip_torch 3.3.0).
const VOCAB_GZ: &[u8] = include_bytes!("../data/bpe_simple_vocab_16e6.txt.gz");
/// open_clip keeps the first 49152 − 256 − 2 merges.
const MERGES: usize = 49152 - 256 - 2;
pub const VOCAB_SIZE: usize = 49408;
pub const START_OF_TEXT: u32 = 49406;
pub const END_OF_TEXT: u32 = 49407;
/// CLIP's split pattern (open_clip `SimpleTokenizer.pat`, special tokens first).
const PATTERN: &str = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

#[derive(Debug)]
pub struct TokenizerError(pub String);

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tokenizer: {}", self.0)
    }
}

impl std::error::Error for TokenizerError {}

fn error(e: impl fmt::Display) -> TokenizerError {
    TokenizerError(e.to_string())
}

pub struct ClipTokenizer {
    bpe: Tokenizer,
}

/// GPT-2's byte → printable-character table, in open_clip's `bytes_to_unicode` order (the
/// order of the first 256 vocabulary entries): the printable bytes as themselves, ascending, then
/// the others mapped to 256, 257, … in ascending byte order.
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: &u32| (33..=126).contains(b) || (161..=172).contains(b) || (174..=255).contains(b);
    let shown = (0..256u32).filter(printable).map(|b| char::from_u32(b).unwrap());
    let hidden =
        (0..256u32).filter(|b| !printable(b)).enumerate().map(|(i, _)| char::from_u32(256 + i as u32).unwrap());
    shown.chain(hidden).collect()
}

impl ClipTokenizer {
    /// The tokenizer of open_clip's shipped vocabulary.
    pub fn new() -> Result<Self, TokenizerError> {
        Self::from_vocab_gz(VOCAB_GZ)
    }

    /// Builds the tokenizer from a `bpe_simple_vocab_16e6.txt.gz`-format vocabulary.
    pub fn from_vocab_gz(gz: &[u8]) -> Result<Self, TokenizerError> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz).read_to_string(&mut text).map_err(error)?;
        let lines: Vec<&str> = text.split('\n').collect();
        if lines.len() < MERGES + 1 {
            return Err(TokenizerError(format!("vocabulary has {} lines, {} merges needed", lines.len(), MERGES)));
        }
        let merges: Vec<(String, String)> = lines[1..=MERGES]
            .iter()
            .map(|l| {
                let (a, b) = l.split_once(' ').ok_or_else(|| TokenizerError(format!("bad merge line '{l}'")))?;
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<Result<_, TokenizerError>>()?;
        let bytes: Vec<String> = bytes_to_unicode().iter().map(|c| c.to_string()).collect();
        let mut vocab: Vec<String> = bytes.clone();
        vocab.extend(bytes.iter().map(|b| format!("{b}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
        debug_assert_eq!(vocab.len(), VOCAB_SIZE);
        let vocab: ahash::AHashMap<String, u32> = vocab.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token("<|endoftext|>".into())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .fuse_unk(false)
            .build()
            .map_err(error)?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer
            .with_normalizer(Some(Normalizers::new(vec![
                NFC.into(),
                Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(error)?.into(),
                Lowercase.into(),
            ])))
            .map_err(error)?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizers::new(vec![
            Split::new(SplitPattern::Regex(PATTERN.into()), SplitDelimiterBehavior::Removed, true)
                .map_err(error)?
                .into(),
            ByteLevel::new(false, false, false).into(),
        ])));
        Ok(ClipTokenizer { bpe: tokenizer })
    }

    /// SOT, the BPE ids of `text`, EOT (no padding, no truncation).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let text = unescape_html(&unescape_html(text));
        let encoding = self.bpe.encode(text.trim(), false).map_err(error)?;
        let mut ids = Vec::with_capacity(encoding.len() + 2);
        ids.push(START_OF_TEXT);
        ids.extend_from_slice(encoding.get_ids());
        ids.push(END_OF_TEXT);
        Ok(ids)
    }

    /// Exactly `context_length` ids, as `open_clip.tokenize`: padded with 0, or cut with the
    /// last id replaced by EOT.
    pub fn tokenize(&self, text: &str, context_length: usize) -> Result<Vec<u32>, TokenizerError> {
        if context_length < 2 {
            return Err(TokenizerError(format!("context length {context_length} cannot hold SOT and EOT")));
        }
        let mut ids = self.encode(text)?;
        if ids.len() > context_length {
            ids.truncate(context_length);
            ids[context_length - 1] = END_OF_TEXT;
        }
        ids.resize(context_length, 0);
        Ok(ids)
    }
}

/// Python's `html.unescape` for numeric references and the common named entities.
pub fn unescape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        // Bytes, not a str slice: the 12th byte may fall inside a multi-byte character.
        let Some(semi) = rest.as_bytes()[..rest.len().min(12)].iter().position(|&b| b == b';') else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let entity = &rest[1..semi];
        let decoded = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some('\u{a0}'),
            _ => entity.strip_prefix('#').and_then(|n| {
                let code = match n.strip_prefix(['x', 'X']) {
                    Some(hex) => u32::from_str_radix(hex, 16).ok(),
                    None => n.parse().ok(),
                };
                code.and_then(char::from_u32)
            }),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ids_from_open_clip() {
        // ../shared/docs/research/data-and-peers.md §2.3, produced by open_clip's SimpleTokenizer.
        let t = ClipTokenizer::new().unwrap();
        assert_eq!(t.encode("a photo of a cat").unwrap(), [49406, 320, 1125, 539, 320, 2368, 49407]);
        assert_eq!(t.encode("an ankle boot").unwrap(), [49406, 550, 14777, 8087, 49407]);
        assert_eq!(
            t.encode("A photo of a T-shirt/top.").unwrap(),
            [49406, 320, 1125, 539, 320, 339, 268, 2523, 270, 1253, 269, 49407]
        );
    }

    #[test]
    fn pads_with_zero_and_truncates_keeping_eot_last() {
        let t = ClipTokenizer::new().unwrap();
        assert_eq!(t.tokenize("a photo of a cat", 10).unwrap(), [49406, 320, 1125, 539, 320, 2368, 49407, 0, 0, 0]);
        let cut = t.tokenize("a photo of a cat", 4).unwrap();
        assert_eq!(cut, [49406, 320, 1125, 49407]);
        assert!(t.tokenize("x", 1).is_err());
    }

    #[test]
    fn unescapes_html_like_python() {
        assert_eq!(unescape_html("a &amp; b &lt;c&gt; &#39;d&#x27; &bogus; & e"), "a & b <c> 'd' &bogus; & e");
        assert_eq!(unescape_html(&unescape_html("&amp;amp;")), "&");
        // A multi-byte character across the entity window (found by tests/hostile_input.rs).
        assert_eq!(unescape_html("&00 a\u{1bc9c} \u{a640}"), "&00 a\u{1bc9c} \u{a640}");
    }
}
