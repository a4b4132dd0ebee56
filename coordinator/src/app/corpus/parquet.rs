//! Captions from a Parquet file: one text column (`data.text_column`, else
//! the first of `caption`, `prompt`, `text`), read a row group at a time
//! through parquet's column reader, page by page, so only the captions
//! themselves accumulate. Null, blank and invalid UTF-8 values are skipped
//! and counted like bad lines of a `.txt` file; a row group that does not
//! decode is an error naming it (its captions are not silently dropped).

use parquet::basic::Type as PhysicalType;
use parquet::column::reader::ColumnReader;
use parquet::file::reader::{ChunkReader, FileReader, SerializedFileReader};
use parquet::schema::types::SchemaDescriptor;
use swiftbrush_proto::caption_source::{CaptionError, Captions, text_caption};
use tokio::runtime::Handle;

use super::object_read::ObjectFile;
use super::{CorpusError, Location, blocking, read_error};

/// Columns tried, in order, when `data.text_column` is unset.
pub(super) const DEFAULT_COLUMNS: [&str; 3] = ["caption", "prompt", "text"];

/// Values decoded per call: bounds the reader's buffers, not the result.
const BATCH: usize = 8192;

pub(super) async fn load(
    source: &str,
    location: Location,
    column: Option<String>,
) -> Result<Captions, CorpusError> {
    let name = source.to_owned();
    match location {
        Location::Local(path) => {
            blocking(source, move || {
                let file =
                    std::fs::File::open(&path).map_err(|e| read_error(&name, e.to_string()))?;
                read_captions(&name, file, column.as_deref(), &|_, _| Ok(()))
            })
            .await
        }
        Location::Object { store, path } => {
            let handle = Handle::current();
            blocking(source, move || {
                let file =
                    ObjectFile::open(handle, store, path).map_err(|e| read_error(&name, e))?;
                let window = file.clone();
                read_captions(&name, file, column.as_deref(), &|start, len| {
                    window.prefetch(start, len)
                })
            })
            .await
        }
    }
}

/// Reads the caption column of `file`; `prefetch(start, len)` is called
/// with each row group's column chunk before it is decoded.
pub(super) fn read_captions<R: ChunkReader + 'static>(
    name: &str,
    file: R,
    column: Option<&str>,
    prefetch: &dyn Fn(u64, u64) -> Result<(), String>,
) -> Result<Captions, CorpusError> {
    let reader = SerializedFileReader::new(file)
        .map_err(|e| read_error(name, format!("not a readable Parquet file: {e}")))?;
    let meta = reader.metadata();
    let index = pick_column(meta.file_metadata().schema_descr(), column)
        .map_err(|reason| read_error(name, reason))?;
    let mut out = Captions::default();
    out.captions
        .reserve(usize::try_from(meta.file_metadata().num_rows()).unwrap_or(0));
    let groups = meta.num_row_groups();
    for group in 0..groups {
        let failed =
            |reason: String| read_error(name, format!("row group {group} of {groups}: {reason}"));
        let (start, len) = meta.row_group(group).column(index).byte_range();
        prefetch(start, len).map_err(failed)?;
        let expected = meta.row_group(group).num_rows();
        let rows =
            read_row_group(&reader, group, index, &mut out).map_err(|e| failed(e.to_string()))?;
        if i64::try_from(rows).ok() != Some(expected) {
            return Err(failed(format!(
                "decoded {rows} rows, the footer says {expected}"
            )));
        }
    }
    if out.captions.is_empty() {
        return Err(CaptionError::Empty {
            name: name.to_owned(),
            stats: out.skipped,
        }
        .into());
    }
    out.captions.shrink_to_fit();
    Ok(out)
}

/// The leaf column index of the caption column.
fn pick_column(schema: &SchemaDescriptor, wanted: Option<&str>) -> Result<usize, String> {
    let top: Vec<&str> = schema
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name())
        .collect();
    let candidates: Vec<&str> = wanted.map_or(DEFAULT_COLUMNS.to_vec(), |c| vec![c]);
    let Some(name) = candidates.iter().copied().find(|c| top.contains(c)) else {
        let key = if wanted.is_some() {
            "data.text_column".to_owned()
        } else {
            format!(
                "none of {} (set data.text_column)",
                DEFAULT_COLUMNS.join(", ")
            )
        };
        return Err(format!(
            "no caption column: {key}; the file's columns are: {}",
            top.join(", ")
        ));
    };
    let index = (0..schema.num_columns())
        .find(|&i| schema.column(i).path().parts() == [name])
        .ok_or_else(|| format!("column `{name}` is nested; expected a string column"))?;
    let leaf = schema.column(index);
    if leaf.physical_type() != PhysicalType::BYTE_ARRAY || leaf.max_rep_level() > 0 {
        return Err(format!(
            "column `{name}` holds {}, not strings",
            leaf.physical_type()
        ));
    }
    Ok(index)
}

fn keep(raw: &[u8], out: &mut Captions) {
    if let Some(caption) = text_caption(raw, &mut out.skipped) {
        out.captions.push(caption);
    }
}

/// Appends one row group's captions; returns its rows.
fn read_row_group<R: ChunkReader + 'static>(
    reader: &SerializedFileReader<R>,
    group: usize,
    index: usize,
    out: &mut Captions,
) -> parquet::errors::Result<usize> {
    let row_group = reader.get_row_group(group)?;
    let max_def = row_group
        .metadata()
        .column(index)
        .column_descr()
        .max_def_level();
    let ColumnReader::ByteArrayColumnReader(mut column) = row_group.get_column_reader(index)?
    else {
        return Err(parquet::errors::ParquetError::General(
            "the caption column is not a byte-array column".to_owned(),
        ));
    };
    let mut defs = Vec::with_capacity(BATCH);
    let mut values = Vec::with_capacity(BATCH);
    let mut rows = 0;
    loop {
        defs.clear();
        values.clear();
        let (records, _, _) = column.read_records(BATCH, Some(&mut defs), None, &mut values)?;
        if records == 0 {
            return Ok(rows);
        }
        rows += records;
        if max_def == 0 {
            values.iter().for_each(|v| keep(v.data(), out));
        } else {
            // Optional column: a null is a row without a caption.
            let mut present = values.iter();
            for &level in &defs {
                match (level == max_def).then(|| present.next()).flatten() {
                    Some(v) => keep(v.data(), out),
                    None => out.skipped.missing_field += 1,
                }
            }
        }
    }
}
