//! Object-store objects for the blocking format readers, run on a blocking
//! thread that drives the store's futures with the runtime's handle:
//! `ObjectFile` answers Parquet's ranged reads (one prefetched window, a
//! row group's caption column, serves its pages), `ObjectStream` streams a
//! tar shard front to back without holding it.

use std::io::{Cursor, Read};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::errors::ParquetError;
use parquet::file::reader::{ChunkReader, Length};
use tokio::runtime::Handle;

/// Reads past a window fetch this much at least (a page header, the footer).
const MIN_FETCH: u64 = 64 * 1024;

#[derive(Clone)]
pub(super) struct ObjectFile {
    handle: Handle,
    store: Arc<dyn ObjectStore>,
    path: Path,
    len: u64,
    /// (start offset, bytes) of the last fetched range.
    window: Arc<Mutex<Option<(u64, Bytes)>>>,
}

impl ObjectFile {
    pub(super) fn open(
        handle: Handle,
        store: Arc<dyn ObjectStore>,
        path: Path,
    ) -> Result<Self, String> {
        let meta = handle
            .block_on(store.head(&path))
            .map_err(|e| e.to_string())?;
        Ok(Self {
            handle,
            store,
            path,
            len: meta.size,
            window: Arc::new(Mutex::new(None)),
        })
    }

    /// Fetches `[start, start + len)` in one request and keeps it, so the
    /// reads inside it (a column chunk's pages) cost no request each.
    pub(super) fn prefetch(&self, start: u64, len: u64) -> Result<(), String> {
        let end = start.saturating_add(len).min(self.len);
        let bytes = self
            .handle
            .block_on(self.store.get_range(&self.path, start..end))
            .map_err(|e| e.to_string())?;
        *self.window.lock().unwrap_or_else(|e| e.into_inner()) = Some((start, bytes));
        Ok(())
    }

    fn range(&self, start: u64, len: u64) -> Result<Bytes, ParquetError> {
        let window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, bytes)) = window.as_ref()
            && start >= *at
            && start + len <= at + bytes.len() as u64
        {
            let from = (start - at) as usize;
            return Ok(bytes.slice(from..from + len as usize));
        }
        drop(window);
        let end = start.saturating_add(len).min(self.len);
        if start > end {
            return Err(ParquetError::EOF(format!(
                "read at {start} past the object's end ({})",
                self.len
            )));
        }
        self.handle
            .block_on(self.store.get_range(&self.path, start..end))
            .map_err(|e| ParquetError::External(Box::new(e)))
    }
}

impl Length for ObjectFile {
    fn len(&self) -> u64 {
        self.len
    }
}

impl ChunkReader for ObjectFile {
    type T = Cursor<Bytes>;

    fn get_read(&self, start: u64) -> Result<Self::T, ParquetError> {
        // Inside the window: the rest of it; else a short read (a header).
        let window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, bytes)) = window.as_ref()
            && start >= *at
            && start < at + bytes.len() as u64
        {
            return Ok(Cursor::new(bytes.slice((start - at) as usize..)));
        }
        drop(window);
        let len = MIN_FETCH.min(self.len.saturating_sub(start));
        self.range(start, len).map(Cursor::new)
    }

    fn get_bytes(&self, start: u64, length: usize) -> Result<Bytes, ParquetError> {
        let bytes = self.range(start, length as u64)?;
        if bytes.len() != length {
            return Err(ParquetError::EOF(format!(
                "wanted {length} bytes at {start}, the object has {}",
                self.len
            )));
        }
        Ok(bytes)
    }
}

/// An object read front to back as `Read`.
pub(super) struct ObjectStream {
    handle: Handle,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    current: Bytes,
}

impl ObjectStream {
    pub(super) fn open(
        handle: Handle,
        store: Arc<dyn ObjectStore>,
        path: Path,
    ) -> Result<Self, String> {
        let result = handle
            .block_on(store.get(&path))
            .map_err(|e| e.to_string())?;
        Ok(Self {
            handle,
            stream: result.into_stream(),
            current: Bytes::new(),
        })
    }
}

impl Read for ObjectStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.handle.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                Some(Ok(bytes)) => self.current = bytes,
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}
