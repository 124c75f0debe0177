"""Token ids from open_clip's SimpleTokenizer (open_clip.tokenize, context 77) for test strings:
case, punctuation, numbers, accents, emoji, CJK, whitespace, HTML entities, long captions.

Writes tests/goldens/tokenizer_open_clip.txt, one string a line: the UTF-8 bytes of the string in
hex, a tab, then the 77 ids separated by spaces (the trailing zero padding left out).

Usage (in a virtualenv with torch and open_clip_torch from PyPI; CPU is enough):
  python tools/golden_tokenizer.py
"""
import os

import open_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRINGS = [
    "a photo of a cat", "an ankle boot", "A photo of a T-shirt/top.", "A PHOTO OF A DOG",
    "a red circle left of a blue square", "a blue square above a green triangle",
    "two red circles and a yellow star", "the cat's toy isn't here, they're gone; we'll see",
    "I've been there, I'm here, you'd know", "numbers: 12345 and 3.14159 and 1,000,000",
    "2024-11-24 at 10:30pm", "phone +1 (555) 012-3456", "café crème brûlée", "naïve résumé façade",
    "Ångström über straße", "Ελληνικά κείμενο", "русский текст", "日本語のテキスト", "中文文本测试",
    "한국어 텍스트", "emoji 😀🎉👍 in text", "flags 🇫🇷🇯🇵", "tabs\tand\nnewlines\r\nand  spaces",
    "   leading and trailing spaces   ", "", "!!!???...", "@user #hashtag $100 50% & more",
    "C++ and C# and F#", "e-mail: someone@example.com", "https://example.com/path?q=1&r=2",
    "fish &amp; chips", "a &lt;b&gt; tag &quot;quoted&quot;", "it&#39;s &#x27;fine&#x27;",
    "double &amp;amp; escaped", "Mixed CASE with ALLCAPS and camelCase", "hyphen-ated well-known word",
    "under_score and snake_case_name", "a/b/c slashes\\back", "quotes \"double\" and 'single'",
    "brackets [square] {curly} (round) <angle>", "ellipsis… em—dash – en-dash", "math ∑ ∫ √ ≈ ≠ ∞",
    "currency € £ ¥ ₹", "superscript x² and subscript H₂O", "a photo of a sneaker.", "a photo of a bag.",
    "a blurry photo of a pullover.", "a black and white photo of a dress.", "a close-up photo of a sandal.",
    "a photo of the large coat.", "a photo of a small trouser.", "itap of a shirt.",
    "a long caption " + "with many words repeated " * 12 + "until it is truncated at the context length",
    " ".join(str(i) for i in range(60)), "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "the quick brown fox jumps over the lazy dog", "THE QUICK BROWN FOX", "x" * 100,
]


def main():
    ids = open_clip.tokenize(STRINGS, context_length=77).tolist()
    out = os.path.join(ROOT, "tests", "goldens", "tokenizer_open_clip.txt")
    with open(out, "w") as f:
        for s, row in zip(STRINGS, ids):
            while row and row[-1] == 0:
                row.pop()
            f.write(s.encode("utf-8").hex() + "\t" + " ".join(map(str, row)) + "\n")
    print(f"wrote {out}: {len(STRINGS)} strings, open_clip {open_clip.__version__}")


if __name__ == "__main__":
    main()
