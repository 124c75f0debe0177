//! open_clip's `CsvDataset`: a delimited file with a header row, one column of image paths and
//! one of captions (`--csv-img-key`, `--csv-caption-key`, `--csv-separator`, tab by default).
//!
//! Rows are read into memory at open so a missing column or an empty file fails before training;
//! images are decoded in `get`, so a missing or corrupt image is one skipped sample, not a crash.
//! Unlike open_clip (which opens paths relative to the working directory), relative image paths
//! are relative to the CSV file's directory, so a data set directory can be moved as a whole.

use std::path::{Path, PathBuf};

use super::{Sample, Source, SourceOptions};

/// The rows of a CSV file: image path and caption.
pub struct CsvSource {
    file: PathBuf,
    rows: Vec<(PathBuf, String)>,
}

impl CsvSource {
    /// Reads every row of `file`; errors name the file and what is wrong with it.
    pub fn open(file: &str, options: &SourceOptions) -> Result<CsvSource, String> {
        let path = PathBuf::from(file);
        if !path.exists() {
            return Err(format!("csv: {file}: no such file"));
        } else if !path.is_file() {
            return Err(format!("csv: {file}: not a file"));
        }
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut reader = ::csv::ReaderBuilder::new()
            .delimiter(options.csv_separator)
            .has_headers(true)
            .from_path(&path)
            .map_err(|e| format!("csv: {file}: {e}"))?;
        let headers = reader.headers().map_err(|e| format!("csv: {file}: header row: {e}"))?.clone();
        let column = |key: &str, flag: &str| {
            headers.iter().position(|h| h.trim_start_matches('\u{feff}') == key).ok_or_else(|| {
                let found: Vec<String> = headers.iter().map(|h| format!("{h:?}")).collect();
                format!(
                    "csv: {file}: no column {key:?} (set {flag}); the header row (separator {:?}) has columns [{}]",
                    options.csv_separator as char,
                    found.join(", ")
                )
            })
        };
        let img_col = column(&options.csv_img_key, "--csv-img-key")?;
        let caption_col = column(&options.csv_caption_key, "--csv-caption-key")?;

        let mut rows = Vec::new();
        for record in reader.records() {
            let record = record.map_err(|e| format!("csv: {file}: {e}"))?;
            // `position` is where the record starts; the header is line 1.
            let line = record.position().map_or(0, |p| p.line());
            let (Some(img), Some(caption)) = (record.get(img_col), record.get(caption_col)) else {
                return Err(format!("csv: {file}: line {line} has {} fields, fewer than the header", record.len()));
            };
            rows.push((base.join(img), caption.to_string()));
        }
        if rows.is_empty() {
            return Err(format!("csv: {file}: no rows after the header"));
        }
        Ok(CsvSource { file: path, rows })
    }
}

impl Source for CsvSource {
    fn describe(&self) -> String {
        format!("csv ({}, {} samples)", self.file.display(), self.rows.len())
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    fn get(&self, i: usize) -> Result<Sample, String> {
        let (path, caption) =
            self.rows.get(i).ok_or_else(|| format!("csv: sample {i} out of range ({})", self.rows.len()))?;
        let caption = caption.trim();
        if caption.is_empty() {
            return Err(format!("{}: empty caption (row {} of {})", path.display(), i + 1, self.file.display()));
        }
        // A device named by a hostile row (/dev/zero, /dev/stdin) would never end: files only.
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{}: not a regular file", path.display()));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let image = super::decode_image(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Sample { image, caption: caption.to_string(), label: None })
    }
}

#[cfg(test)]
mod tests {
    use image::RgbImage;

    use super::*;

    /// A temp dir with two good PNGs, a corrupt PNG, and `data.tsv` listing them plus a missing
    /// file and an empty caption.
    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        RgbImage::from_pixel(4, 3, image::Rgb([10, 20, 30])).save(dir.path().join("a.png")).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        RgbImage::from_pixel(2, 5, image::Rgb([200, 100, 0])).save(dir.path().join("sub/b.png")).unwrap();
        std::fs::write(dir.path().join("corrupt.png"), b"\x89PNG\r\n\x1a\nbroken").unwrap();
        let tsv = "id\tfilepath\ttitle\n\
                   1\ta.png\ta red thing\n\
                   2\tsub/b.png\t  an orange tall thing  \n\
                   3\tcorrupt.png\tbroken\n\
                   4\tmissing.png\tnothing\n\
                   5\ta.png\t   \n";
        std::fs::write(dir.path().join("data.tsv"), tsv).unwrap();
        dir
    }

    #[test]
    fn good_rows_load_and_bad_rows_are_errors_naming_the_file() {
        let dir = fixture();
        let file = dir.path().join("data.tsv");
        let ds = CsvSource::open(file.to_str().unwrap(), &SourceOptions::default()).unwrap();
        assert_eq!(ds.len(), 5);
        assert_eq!(ds.describe(), format!("csv ({}, 5 samples)", file.display()));

        let a = ds.get(0).unwrap();
        assert_eq!(a.image.dimensions(), (4, 3));
        assert_eq!(a.image.get_pixel(3, 2).0, [10, 20, 30]);
        assert_eq!(a.caption, "a red thing");
        assert_eq!(a.label, None);
        let b = ds.get(1).unwrap();
        assert_eq!(b.image.dimensions(), (2, 5));
        assert_eq!(b.image.get_pixel(1, 4).0, [200, 100, 0]);
        // Captions are trimmed.
        assert_eq!(b.caption, "an orange tall thing");

        let err = ds.get(2).unwrap_err();
        assert!(err.contains("corrupt.png: "), "{err}");
        let err = ds.get(3).unwrap_err();
        assert!(err.contains("missing.png: "), "{err}");
        let err = ds.get(4).unwrap_err();
        assert!(err.contains("a.png: empty caption"), "{err}");
        assert!(ds.get(5).is_err());
    }

    #[test]
    fn missing_column_is_an_error_naming_it() {
        let dir = fixture();
        let file = dir.path().join("data.tsv");
        let options = SourceOptions { csv_caption_key: "caption".into(), ..SourceOptions::default() };
        let err = CsvSource::open(file.to_str().unwrap(), &options).err().unwrap();
        assert!(err.contains("no column \"caption\""), "{err}");
        assert!(err.contains("data.tsv"), "{err}");
        assert!(err.contains("[\"id\", \"filepath\", \"title\"]"), "{err}");
        // With the default tab separator, a comma-separated file is one column named by its whole header.
        std::fs::write(dir.path().join("comma.csv"), "filepath,title\na.png,x\n").unwrap();
        let file = dir.path().join("comma.csv");
        let err = CsvSource::open(file.to_str().unwrap(), &SourceOptions::default()).err().unwrap();
        assert!(err.contains("no column \"filepath\"") && err.contains("[\"filepath,title\"]"), "{err}");
    }

    #[test]
    fn missing_or_empty_csv_is_an_error_naming_the_path() {
        let dir = fixture();
        let file = dir.path().join("nope.tsv");
        let err = CsvSource::open(file.to_str().unwrap(), &SourceOptions::default()).err().unwrap();
        assert!(err.contains("nope.tsv") && err.contains("no such file"), "{err}");
        std::fs::write(dir.path().join("empty.tsv"), "filepath\ttitle\n").unwrap();
        let file = dir.path().join("empty.tsv");
        let err = CsvSource::open(file.to_str().unwrap(), &SourceOptions::default()).err().unwrap();
        assert!(err.contains("empty.tsv: no rows"), "{err}");
    }

    #[test]
    fn comma_separator_and_custom_keys() {
        let dir = fixture();
        let abs = dir.path().join("a.png");
        // Spreadsheet exports start with a UTF-8 byte order mark, which is not part of the first name.
        let csv = format!("\u{feff}caption,image\n\"a red, small thing\",{}\n\"a thing\",sub/b.png\n", abs.display());
        std::fs::write(dir.path().join("data.csv"), csv).unwrap();
        let options = SourceOptions {
            csv_img_key: "image".into(),
            csv_caption_key: "caption".into(),
            csv_separator: b',',
            ..SourceOptions::default()
        };
        let file = dir.path().join("data.csv");
        let ds = CsvSource::open(file.to_str().unwrap(), &options).unwrap();
        assert_eq!(ds.len(), 2);
        let a = ds.get(0).unwrap();
        assert_eq!(a.caption, "a red, small thing");
        assert_eq!(a.image.dimensions(), (4, 3));
        assert_eq!(ds.get(1).unwrap().image.dimensions(), (2, 5));
    }

    #[test]
    fn short_row_is_an_error_with_its_line() {
        let dir = fixture();
        std::fs::write(dir.path().join("short.tsv"), "filepath\ttitle\na.png\tx\nb.png\n").unwrap();
        let file = dir.path().join("short.tsv");
        let err = CsvSource::open(file.to_str().unwrap(), &SourceOptions::default()).err().unwrap();
        assert!(err.contains("short.tsv"), "{err}");
        // The csv crate's message: "record 2 (line: 3, byte: 23): found record with 1 fields, …".
        assert!(err.contains("line: 3") && err.contains("1 fields"), "{err}");
    }
}
