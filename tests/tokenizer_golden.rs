//! Token ids identical to open_clip's tokenizer (tools/golden_tokenizer.py: open_clip.tokenize,
//! context 77) on 58 strings: case, punctuation, digits, accents, emoji, CJK, whitespace, HTML
//! entities, a caption long enough to be truncated.

mod common;

use clip_pgs_model::tokenizer::ClipTokenizer;

fn unhex(hex: &str) -> String {
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn ids_equal_open_clip() {
    let golden = String::from_utf8(common::golden("tokenizer_open_clip.txt")).unwrap();
    let tokenizer = ClipTokenizer::new().unwrap();
    let mut checked = 0;
    let mut differ = Vec::new();
    for line in golden.lines() {
        let (hex, ids) = line.split_once('\t').unwrap();
        let text = unhex(hex);
        let mut want: Vec<u32> = ids.split(' ').map(|v| v.parse().unwrap()).collect();
        want.resize(77, 0);
        let got = tokenizer.tokenize(&text, 77).unwrap();
        if got != want {
            differ.push(format!("{text:?}\n  ours      {got:?}\n  open_clip {want:?}"));
        }
        checked += 1;
    }
    assert!(checked >= 50, "only {checked} strings");
    assert!(differ.is_empty(), "{} of {checked} differ:\n{}", differ.len(), differ.join("\n"));
}
