//! 2-D and 3-D TIFF files as `ndarray` arrays.
//!
//! A one-page file reads as a 2-D array `(height, width)`, a multi-page file as a 3-D array
//! `(pages, height, width)`; pages are a z axis for volumes and a channel axis for prediction or
//! target stacks. Writing is the inverse: a 2-D array becomes one page, a 3-D array one page per
//! index of its first axis.
//!
//! Reading handles every compression the LIVECell and CREMI data use (none, LZW, Deflate,
//! PackBits, with or without the horizontal predictor; strips or tiles; classic or BigTIFF;
//! either byte order). Signed-integer files are accepted when they hold no negative value, and
//! f64 files are narrowed to f32. A page with several samples per pixel (RGB, RGBA, multiband;
//! interleaved or planar) reads as channels, and 1-bit masks as u8 0/1.

use std::fs::File;
use std::io::{BufReader, Seek, Write};
use std::path::Path;

use ::tiff::decoder::{Decoder, DecodingResult};
use ::tiff::encoder::{colortype, DeflateLevel, TiffEncoder};
use ::tiff::tags::Predictor;
use ::tiff::ColorType;
use ndarray::{ArrayD, ArrayView, Dimension, IxDyn};

use crate::atomic::write_atomically;
use crate::{Error, Result};

/// The element type of a TIFF image as this crate returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleType {
    U8,
    U16,
    U32,
    U64,
    F32,
}

impl SampleType {
    /// The Rust name of the type, e.g. `"u16"`.
    pub fn name(self) -> &'static str {
        match self {
            SampleType::U8 => "u8",
            SampleType::U16 => "u16",
            SampleType::U32 => "u32",
            SampleType::U64 => "u64",
            SampleType::F32 => "f32",
        }
    }
}

/// A decoded TIFF file: 2-D for one page, 3-D `(pages, height, width)` for several.
#[derive(Debug, Clone, PartialEq)]
pub enum TiffImage {
    U8(ArrayD<u8>),
    U16(ArrayD<u16>),
    U32(ArrayD<u32>),
    U64(ArrayD<u64>),
    F32(ArrayD<f32>),
}

impl TiffImage {
    /// The array's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            TiffImage::U8(a) => a.shape(),
            TiffImage::U16(a) => a.shape(),
            TiffImage::U32(a) => a.shape(),
            TiffImage::U64(a) => a.shape(),
            TiffImage::F32(a) => a.shape(),
        }
    }

    /// The element type.
    pub fn sample_type(&self) -> SampleType {
        match self {
            TiffImage::U8(_) => SampleType::U8,
            TiffImage::U16(_) => SampleType::U16,
            TiffImage::U32(_) => SampleType::U32,
            TiffImage::U64(_) => SampleType::U64,
            TiffImage::F32(_) => SampleType::F32,
        }
    }

    /// The image as a label image with u64 ids.
    ///
    /// Integer images convert losslessly. A float image is accepted only if every value is a
    /// non-negative integer below 2^24 (some tools save labels as float); otherwise
    /// [`Error::Conversion`] names the first offending value.
    pub fn into_labels(self) -> Result<ArrayD<u64>> {
        Ok(match self {
            TiffImage::U8(a) => a.mapv(u64::from),
            TiffImage::U16(a) => a.mapv(u64::from),
            TiffImage::U32(a) => a.mapv(u64::from),
            TiffImage::U64(a) => a,
            TiffImage::F32(a) => {
                check_float_ids(&a)?;
                a.mapv(|v| v as u64)
            }
        })
    }

    /// The image as a label image with u32 ids, the width every consumer of label images in
    /// this project works in: 8- and 16-bit images widen to 32 bits only, 32-bit images are
    /// taken as they are, and 64-bit ids are accepted when they fit in 32 bits. Float images
    /// follow [`TiffImage::into_labels`]'s rule.
    ///
    /// # Errors
    /// [`Error::Conversion`] naming the first id that does not fit or float that is not an id.
    pub fn into_label_ids(self) -> Result<ArrayD<u32>> {
        if !matches!(self, TiffImage::U32(_)) {
            crate::memory::check_allocation(
                Path::new("label image"),
                &format!("its {} ids as u32", self.shape().iter().product::<usize>()),
                crate::memory::product(&[self.shape().iter().product(), 4]),
                "split the image into smaller files",
            )?;
        }
        Ok(match self {
            TiffImage::U8(a) => a.mapv(u32::from),
            TiffImage::U16(a) => a.mapv(u32::from),
            TiffImage::U32(a) => a,
            TiffImage::U64(a) => {
                if let Some(bad) = a.iter().find(|v| **v > u64::from(u32::MAX)) {
                    return Err(Error::Conversion {
                        from: "u64",
                        to: "32-bit label ids",
                        what: format!("id {bad} is above 2^32 − 1; relabel the image"),
                    });
                }
                a.mapv(|v| v as u32)
            }
            TiffImage::F32(a) => {
                check_float_ids(&a)?;
                a.mapv(|v| v as u32)
            }
        })
    }

    /// The image as f32. Exact for u8, u16 and f32; u32 and u64 values above 2^24 are rounded
    /// to the nearest f32.
    pub fn into_f32(self) -> ArrayD<f32> {
        match self {
            TiffImage::U8(a) => a.mapv(f32::from),
            TiffImage::U16(a) => a.mapv(f32::from),
            TiffImage::U32(a) => a.mapv(|v| v as f32),
            TiffImage::U64(a) => a.mapv(|v| v as f32),
            TiffImage::F32(a) => a,
        }
    }
}

/// Reads a TIFF file: one page gives a 2-D array, several pages a 3-D array, and one page of
/// several samples per pixel (RGB, RGBA or multiband; interleaved or planar, as tifffile writes a
/// `(3, H, W)` float stack by default) a 3-D `(samples, height, width)` array. 1-bit masks read
/// as u8 0/1.
///
/// # Errors
/// [`Error::Io`] if the file cannot be opened, [`Error::Tiff`] if it is corrupt, truncated or not
/// a TIFF, [`Error::Unsupported`] for palette, CMYK and YCbCr images, sub-byte depths other than
/// 1-bit masks, several pages of multi-sample images and unsupported pixel types,
/// [`Error::Content`] if pages differ in size or type or a signed file holds negative values.
pub fn read_tiff(path: impl AsRef<Path>) -> Result<TiffImage> {
    let path = path.as_ref();
    let tiff_err = |source| Error::Tiff {
        path: path.to_path_buf(),
        source,
    };
    let mut decoder = open_decoder(path)?;
    let mut pages = Vec::new();
    let mut page_shape = None;
    let mut channels = 1;
    loop {
        let index = pages.len();
        let (samples, bits) = match decoder.colortype().map_err(tiff_err)? {
            ColorType::Gray(b) => (1, b),
            ColorType::GrayA(b) => (2, b),
            ColorType::RGB(b) => (3, b),
            ColorType::RGBA(b) => (4, b),
            ColorType::Multiband {
                bit_depth,
                num_samples,
            } => (usize::from(num_samples), bit_depth),
            other => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    what: format!(
                        "page {index} has colour type {other:?}; grey images and images whose \
                         samples are channels (RGB, RGBA, multiband) are supported"
                    ),
                })
            }
        };
        if bits < 8 && (bits != 1 || samples != 1) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: format!(
                    "page {index} has {samples} sample(s) of {bits} bits; of the sub-byte depths \
                     only 1-bit single-channel masks are supported"
                ),
            });
        }
        let (width, height) = decoder.dimensions().map_err(tiff_err)?;
        let shape = (height as usize, width as usize);
        // The pages read so far and this one, at the width this reader keeps them in.
        let kept_bytes = usize::from(bits).div_ceil(8).clamp(1, 4);
        crate::memory::check_allocation(
            path,
            &format!("page {index} ({}×{} × {samples} samples)", shape.0, shape.1),
            crate::memory::product(&[index + 1, shape.0, shape.1, samples, kept_bytes]),
            "split the stack into smaller files",
        )?;
        match page_shape {
            None => {
                page_shape = Some(shape);
                channels = samples;
            }
            Some(first) if first != shape || channels != samples => {
                return Err(Error::Content {
                    path: path.to_path_buf(),
                    what: format!(
                        "page {index} is {}x{} with {samples} sample(s) but page 0 is {}x{} with \
                         {channels}; pages must have one size",
                        shape.0, shape.1, first.0, first.1
                    ),
                })
            }
            Some(_) => {}
        }
        let planar = decoder
            .find_tag_unsigned::<u16>(::tiff::tags::Tag::PlanarConfiguration)
            .map_err(tiff_err)?
            == Some(2);
        // Reads every sample plane (`read_image` would read only the first of a planar file).
        let mut decoded = DecodingResult::U8(Vec::new());
        decoder
            .read_image_to_buffer(&mut decoded)
            .map_err(tiff_err)?;
        let mut page = Page::from_decoded(decoded, path, index)?;
        if bits == 1 {
            page = page.unpack_bits(shape);
        }
        if page.len() != shape.0 * shape.1 * samples {
            return Err(Error::Content {
                path: path.to_path_buf(),
                what: format!(
                    "page {index} decoded to {} values, expected {}x{}x{samples}",
                    page.len(),
                    shape.0,
                    shape.1
                ),
            });
        }
        if samples > 1 && !planar {
            page = page.channels_first(samples);
        }
        pages.push(page);
        if !decoder.more_images() {
            break;
        }
        decoder.next_image().map_err(tiff_err)?;
    }
    let (height, width) = page_shape.unwrap_or((0, 0));
    let shape = match (pages.len(), channels) {
        (1, 1) => IxDyn(&[height, width]),
        (n, 1) => IxDyn(&[n, height, width]),
        (1, c) => IxDyn(&[c, height, width]),
        (n, c) => {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                what: format!(
                    "{n} pages of {c} samples each; a multi-sample image must have one page \
                     (its samples are the channels)"
                ),
            })
        }
    };
    Page::concat(pages, shape, path)
}

/// The samples per pixel of a TIFF file's first page (1 for grey images, 3 for RGB, …), read
/// from its header only: whether [`read_tiff`]'s third axis is channels rather than pages.
///
/// # Errors
/// [`Error::Io`] and [`Error::Tiff`] as [`read_tiff`].
pub fn samples_per_pixel(path: impl AsRef<Path>) -> Result<usize> {
    let path = path.as_ref();
    Ok(open_decoder(path)?
        .find_tag_unsigned::<u16>(::tiff::tags::Tag::SamplesPerPixel)
        .map_err(|source| Error::Tiff {
            path: path.to_path_buf(),
            source,
        })?
        .map_or(1, usize::from))
}

/// A grey TIFF stack (or one page) as a [`crate::volume::VolumeSource`] read box by box: a box
/// decodes only the strips or tiles of its pages that it overlaps, so a blockwise prediction
/// holds a few chunks of the file, never the stack (nor a whole page, where the file is striped
/// or tiled finer than its pages).
///
/// Every page must be one grey sample of 8 bits or more and of one size (checked on opening,
/// from the page headers). Decoded chunks are kept, up to 256 MiB, for the neighbouring boxes
/// that overlap them (halos).
pub struct TiffStack {
    path: std::path::PathBuf,
    shape: [usize; 3],
    z0: usize,
    /// Each page's chunks: (tiled, chunk width, chunk height), read from the page headers.
    layouts: Vec<(bool, usize, usize)>,
    reader: std::sync::Mutex<StackReader>,
}

/// (page, chunk index).
type ChunkKey = (usize, u32);

struct StackReader {
    decoder: Decoder<BufReader<File>>,
    page: usize,
    /// Decoded chunks by (page, chunk index), oldest first.
    cache: std::collections::VecDeque<(ChunkKey, std::sync::Arc<Vec<f32>>)>,
    cached_values: usize,
    decoded: usize,
}

/// Values of decoded chunks a [`TiffStack`] keeps (256 MiB of f32).
const STACK_CACHE_VALUES: usize = 64 << 20;

impl TiffStack {
    /// Opens `path`, all pages or the pages `pages`.
    ///
    /// # Errors
    /// [`Error::Io`] and [`Error::Tiff`] as [`read_tiff`]; [`Error::Unsupported`] for pages of
    /// several samples, sub-byte depths or another colour type; [`Error::Content`] for pages of
    /// different sizes, an empty file or `pages` outside the stack.
    pub fn open(path: impl AsRef<Path>, pages: Option<std::ops::Range<usize>>) -> Result<Self> {
        let path = path.as_ref();
        let tiff_err = |source| Error::Tiff {
            path: path.to_path_buf(),
            source,
        };
        let mut decoder = open_decoder(path)?;
        let mut size = None;
        let mut count = 0usize;
        let mut layouts = Vec::new();
        loop {
            match decoder.colortype().map_err(tiff_err)? {
                ColorType::Gray(b) if b >= 8 => {}
                other => {
                    return Err(Error::Unsupported {
                        path: path.to_path_buf(),
                        what: format!(
                            "page {count} has colour type {other:?}; a stack read box by box \
                             must hold one grey sample of 8 bits or more per pixel"
                        ),
                    })
                }
            }
            let (w, h) = decoder.dimensions().map_err(tiff_err)?;
            let (h, w) = (h as usize, w as usize);
            match size {
                None => size = Some((h, w)),
                Some(first) if first != (h, w) => {
                    return Err(Error::Content {
                        path: path.to_path_buf(),
                        what: format!(
                            "page {count} is {h}x{w} but page 0 is {}x{}; pages must have one size",
                            first.0, first.1
                        ),
                    })
                }
                Some(_) => {}
            }
            let (cw, ch) = decoder.chunk_dimensions();
            let tiled = decoder.get_chunk_type() == ::tiff::decoder::ChunkType::Tile;
            layouts.push((tiled, (cw as usize).max(1), (ch as usize).max(1)));
            count += 1;
            if !decoder.more_images() {
                break;
            }
            decoder.next_image().map_err(tiff_err)?;
        }
        let (h, w) = size.unwrap_or((0, 0));
        let pages = pages.unwrap_or(0..count);
        if pages.start >= pages.end || pages.end > count || h == 0 || w == 0 {
            return Err(Error::Content {
                path: path.to_path_buf(),
                what: format!("pages {pages:?} of a stack of {count} pages of {h}x{w}"),
            });
        }
        decoder.seek_to_image(pages.start).map_err(tiff_err)?;
        Ok(TiffStack {
            path: path.to_path_buf(),
            shape: [pages.len(), h, w],
            z0: pages.start,
            layouts,
            reader: std::sync::Mutex::new(StackReader {
                decoder,
                page: pages.start,
                cache: std::collections::VecDeque::new(),
                cached_values: 0,
                decoded: 0,
            }),
        })
    }

    /// How many strips or tiles have been decoded so far (a box decodes only those it overlaps
    /// and has not kept).
    pub fn chunks_decoded(&self) -> usize {
        self.reader.lock().map_or(0, |r| r.decoded)
    }
}

impl StackReader {
    /// Chunk `index` of page `page` as f32 values (its data rows, padding cut), from the cache
    /// or decoded.
    fn chunk(&mut self, path: &Path, page: usize, index: u32) -> Result<std::sync::Arc<Vec<f32>>> {
        if let Some((_, v)) = self.cache.iter().find(|(k, _)| *k == (page, index)) {
            return Ok(v.clone());
        }
        let tiff_err = |source| Error::Tiff {
            path: path.to_path_buf(),
            source,
        };
        if self.page != page {
            self.decoder.seek_to_image(page).map_err(tiff_err)?;
            self.page = page;
        }
        let (cw, ch) = self.decoder.chunk_dimensions();
        crate::memory::check_allocation(
            path,
            &format!("a chunk of {ch}×{cw} of page {page}"),
            crate::memory::product(&[cw as usize, ch as usize, 8]),
            "rewrite the file with smaller strips or tiles",
        )?;
        let decoded = self.decoder.read_chunk(index).map_err(tiff_err)?;
        let values = std::sync::Arc::new(Page::from_decoded(decoded, path, page)?.into_f32());
        self.decoded += 1;
        self.cached_values += values.len();
        self.cache.push_back(((page, index), values.clone()));
        while self.cached_values > STACK_CACHE_VALUES && self.cache.len() > 1 {
            if let Some((_, old)) = self.cache.pop_front() {
                self.cached_values -= old.len();
            }
        }
        Ok(values)
    }
}

impl crate::volume::VolumeSource for TiffStack {
    fn shape(&self) -> [usize; 3] {
        self.shape
    }

    fn read_box(
        &self,
        z: std::ops::Range<usize>,
        y: std::ops::Range<usize>,
        x: std::ops::Range<usize>,
    ) -> Result<ndarray::Array3<f32>> {
        let [d, h, w] = self.shape;
        let inside = |r: &std::ops::Range<usize>, n: usize| r.start < r.end && r.end <= n;
        if !(inside(&z, d) && inside(&y, h) && inside(&x, w)) {
            return Err(Error::Content {
                path: self.path.clone(),
                what: format!(
                    "the box {z:?} × {y:?} × {x:?} is not inside the stack ({d} × {h} × {w})"
                ),
            });
        }
        let mut reader = self.reader.lock().map_err(|_| Error::Content {
            path: self.path.clone(),
            what: "a reader thread failed".into(),
        })?;
        let mut out = ndarray::Array3::zeros((z.len(), y.len(), x.len()));
        for (i, slice) in z.clone().enumerate() {
            let page = self.z0 + slice;
            let (tiled, cw, ch) = self.layouts[page];
            let across = if tiled { w.div_ceil(cw) } else { 1 };
            let cols = if tiled {
                x.start / cw..(x.end - 1) / cw + 1
            } else {
                0..1
            };
            for row in y.start / ch..(y.end - 1) / ch + 1 {
                for col in cols.clone() {
                    let index = u32::try_from(row * across + col).map_err(|_| Error::Content {
                        path: self.path.clone(),
                        what: format!("page {page} has more than 2^32 chunks"),
                    })?;
                    let values = reader.chunk(&self.path, page, index)?;
                    // The chunk's data: rows y0.., columns x0.., `cols_in` wide.
                    let (y0, x0) = (row * ch, if tiled { col * cw } else { 0 });
                    let cols_in = if tiled { cw.min(w - x0) } else { w };
                    let rows_in = values.len() / cols_in.max(1);
                    if rows_in * cols_in != values.len() || rows_in == 0 {
                        return Err(Error::Content {
                            path: self.path.clone(),
                            what: format!(
                                "chunk {index} of page {page} decoded to {} values, not rows of {cols_in}",
                                values.len()
                            ),
                        });
                    }
                    let ys = y.start.max(y0)..y.end.min(y0 + rows_in);
                    let xs = x.start.max(x0)..x.end.min(x0 + cols_in);
                    for yy in ys {
                        let src = &values[(yy - y0) * cols_in + (xs.start - x0)..][..xs.len()];
                        let mut dst = out.slice_mut(ndarray::s![
                            i,
                            yy - y.start,
                            xs.start - x.start..xs.end - x.start
                        ]);
                        for (d, s) in dst.iter_mut().zip(src) {
                            *d = *s;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// A decoder positioned at the first page of `path`.
fn open_decoder(path: &Path) -> Result<Decoder<BufReader<File>>> {
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Decoder::new(BufReader::new(file)).map_err(|source| Error::Tiff {
        path: path.to_path_buf(),
        source,
    })
}

/// Float labels are accepted only when every value is a non-negative integer below 2^24 (where
/// f32 is still exact).
fn check_float_ids(a: &ArrayD<f32>) -> Result<()> {
    match a
        .iter()
        .find(|v| !(v.is_finite() && **v >= 0.0 && v.fract() == 0.0 && **v < 16_777_216.0))
    {
        Some(bad) => Err(Error::Conversion {
            from: "f32",
            to: "label ids",
            what: format!("value {bad} is not a non-negative integer below 2^24"),
        }),
        None => Ok(()),
    }
}

/// One decoded page, with signed and f64 data already converted.
enum Page {
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    F32(Vec<f32>),
}

impl Page {
    fn from_decoded(data: DecodingResult, path: &Path, index: usize) -> Result<Page> {
        fn unsigned<S: Copy + PartialOrd + Default + std::fmt::Display, U>(
            data: Vec<S>,
            cast: impl Fn(S) -> U,
            path: &Path,
            index: usize,
        ) -> Result<Vec<U>> {
            if let Some(v) = data.iter().find(|v| **v < S::default()) {
                return Err(Error::Content {
                    path: path.to_path_buf(),
                    what: format!(
                        "page {index} holds the negative value {v}; signed images are read only when all values are >= 0"
                    ),
                });
            }
            Ok(data.into_iter().map(cast).collect())
        }
        Ok(match data {
            DecodingResult::U8(v) => Page::U8(v),
            DecodingResult::U16(v) => Page::U16(v),
            DecodingResult::U32(v) => Page::U32(v),
            DecodingResult::U64(v) => Page::U64(v),
            DecodingResult::F32(v) => Page::F32(v),
            DecodingResult::F64(v) => Page::F32(v.into_iter().map(|x| x as f32).collect()),
            DecodingResult::I8(v) => Page::U8(unsigned(v, |x| x as u8, path, index)?),
            DecodingResult::I16(v) => Page::U16(unsigned(v, |x| x as u16, path, index)?),
            DecodingResult::I32(v) => Page::U32(unsigned(v, |x| x as u32, path, index)?),
            DecodingResult::I64(v) => Page::U64(unsigned(v, |x| x as u64, path, index)?),
            DecodingResult::F16(_) => {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    what: format!("page {index} holds 16-bit floats"),
                })
            }
        })
    }

    /// A 1-bit page's rows of packed bits (most significant bit first, each row starting on a
    /// byte) as one u8 of 0 or 1 per pixel.
    fn unpack_bits(self, (h, w): (usize, usize)) -> Page {
        match self {
            Page::U8(packed) => {
                let stride = w.div_ceil(8);
                if packed.len() != h * stride {
                    return Page::U8(packed); // the length check names the mismatch
                }
                let mut out = Vec::with_capacity(h * w);
                for row in packed.chunks_exact(stride) {
                    out.extend((0..w).map(|x| (row[x / 8] >> (7 - x % 8)) & 1));
                }
                Page::U8(out)
            }
            other => other,
        }
    }

    /// Interleaved samples `(y, x, c)` reordered to channel planes `(c, y, x)`.
    fn channels_first(self, c: usize) -> Page {
        fn reorder<T: Copy>(v: Vec<T>, c: usize) -> Vec<T> {
            let n = v.len() / c;
            (0..c)
                .flat_map(|k| (0..n).map(move |i| (k, i)))
                .map(|(k, i)| v[i * c + k])
                .collect()
        }
        match self {
            Page::U8(v) => Page::U8(reorder(v, c)),
            Page::U16(v) => Page::U16(reorder(v, c)),
            Page::U32(v) => Page::U32(reorder(v, c)),
            Page::U64(v) => Page::U64(reorder(v, c)),
            Page::F32(v) => Page::F32(reorder(v, c)),
        }
    }

    fn into_f32(self) -> Vec<f32> {
        match self {
            Page::U8(v) => v.into_iter().map(f32::from).collect(),
            Page::U16(v) => v.into_iter().map(f32::from).collect(),
            Page::U32(v) => v.into_iter().map(|x| x as f32).collect(),
            Page::U64(v) => v.into_iter().map(|x| x as f32).collect(),
            Page::F32(v) => v,
        }
    }

    fn len(&self) -> usize {
        match self {
            Page::U8(v) => v.len(),
            Page::U16(v) => v.len(),
            Page::U32(v) => v.len(),
            Page::U64(v) => v.len(),
            Page::F32(v) => v.len(),
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Page::U8(_) => "u8",
            Page::U16(_) => "u16",
            Page::U32(_) => "u32",
            Page::U64(_) => "u64",
            Page::F32(_) => "f32",
        }
    }

    fn concat(pages: Vec<Page>, shape: IxDyn, path: &Path) -> Result<TiffImage> {
        macro_rules! join {
            ($variant:ident) => {{
                let mut all = Vec::with_capacity(shape.size());
                for (index, page) in pages.into_iter().enumerate() {
                    match page {
                        Page::$variant(v) => all.extend(v),
                        other => {
                            return Err(Error::Content {
                                path: path.to_path_buf(),
                                what: format!(
                                    "page {index} holds {} but page 0 holds {}; pages must have one type",
                                    other.type_name(),
                                    stringify!($variant).to_lowercase()
                                ),
                            })
                        }
                    }
                }
                TiffImage::$variant(
                    ArrayD::from_shape_vec(shape, all).expect("page sizes were checked"),
                )
            }};
        }
        Ok(match pages.first() {
            Some(Page::U8(_)) | None => join!(U8),
            Some(Page::U16(_)) => join!(U16),
            Some(Page::U32(_)) => join!(U32),
            Some(Page::U64(_)) => join!(U64),
            Some(Page::F32(_)) => join!(F32),
        })
    }
}

/// Compression for [`write_tiff`]. Integer images are written with the horizontal predictor
/// when compressed (the TIFF encoder supports no predictor for floats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    None,
    Lzw,
    /// Deflate at the default level; the default: lossless and compact for label images.
    #[default]
    Deflate,
    PackBits,
}

/// Options for [`write_tiff`].
#[non_exhaustive]
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub compression: Compression,
}

/// Element types [`write_tiff`] can store.
pub trait TiffSample: Copy + sealed::Sealed {
    #[doc(hidden)]
    fn write_page<W: Write + Seek>(
        encoder: &mut TiffEncoder<W>,
        width: u32,
        height: u32,
        data: &[Self],
    ) -> ::tiff::TiffResult<()>;
    #[doc(hidden)]
    const INTEGER: bool;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for u8 {}
    impl Sealed for u16 {}
    impl Sealed for u32 {}
    impl Sealed for u64 {}
    impl Sealed for f32 {}
}

macro_rules! tiff_sample {
    ($t:ty, $color:ty, $integer:expr) => {
        impl TiffSample for $t {
            fn write_page<W: Write + Seek>(
                encoder: &mut TiffEncoder<W>,
                width: u32,
                height: u32,
                data: &[Self],
            ) -> ::tiff::TiffResult<()> {
                encoder.write_image::<$color>(width, height, data)
            }
            const INTEGER: bool = $integer;
        }
    };
}
tiff_sample!(u8, colortype::Gray8, true);
tiff_sample!(u16, colortype::Gray16, true);
tiff_sample!(u32, colortype::Gray32, true);
tiff_sample!(u64, colortype::Gray64, true);
tiff_sample!(f32, colortype::Gray32Float, false);

/// Writes a 2-D array as a one-page TIFF or a 3-D array `(pages, height, width)` as a multi-page
/// TIFF, atomically (see [`crate::atomic`]).
///
/// # Errors
/// [`Error::Shape`] for arrays that are not 2-D or 3-D, are empty, or exceed TIFF's u32 sizes;
/// [`Error::Io`] / [`Error::Tiff`] if writing fails (the destination is then left untouched).
pub fn write_tiff<T: TiffSample, D: Dimension>(
    path: impl AsRef<Path>,
    array: ArrayView<T, D>,
    options: &WriteOptions,
) -> Result<()> {
    let path = path.as_ref();
    let shape_err = |what: &str| Error::Shape {
        path: path.to_path_buf(),
        shape: array.shape().to_vec(),
        what: what.to_owned(),
    };
    let (pages, height, width) = match *array.shape() {
        [h, w] => (1, h, w),
        [p, h, w] => (p, h, w),
        _ => return Err(shape_err("only 2-D and 3-D arrays can be written")),
    };
    if pages == 0 || height == 0 || width == 0 {
        return Err(shape_err("a TIFF page cannot be empty"));
    }
    let (Ok(w32), Ok(h32)) = (u32::try_from(width), u32::try_from(height)) else {
        return Err(shape_err("height and width must fit in 32 bits"));
    };
    let data = array.as_standard_layout();
    let data = data.as_slice().expect("standard layout is contiguous");
    let page_len = height * width;
    write_atomically(path, |writer| {
        let tiff_err = |source: ::tiff::TiffError| Error::Write {
            path: path.to_path_buf(),
            what: match source {
                ::tiff::TiffError::IoError(e) => e.to_string(),
                other => other.to_string(),
            },
        };
        let compression = match options.compression {
            Compression::None => ::tiff::encoder::Compression::Uncompressed,
            Compression::Lzw => ::tiff::encoder::Compression::Lzw,
            Compression::Deflate => ::tiff::encoder::Compression::Deflate(DeflateLevel::Balanced),
            Compression::PackBits => ::tiff::encoder::Compression::Packbits,
        };
        let predictor = if T::INTEGER && options.compression != Compression::None {
            Predictor::Horizontal
        } else {
            Predictor::None
        };
        let mut encoder = TiffEncoder::new(writer)
            .map_err(tiff_err)?
            .with_compression(compression)
            .with_predictor(predictor);
        for page in data.chunks_exact(page_len) {
            T::write_page(&mut encoder, w32, h32, page).map_err(tiff_err)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, Array3};
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("seg-data-tiff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    const ALL: [Compression; 4] = [
        Compression::None,
        Compression::Lzw,
        Compression::Deflate,
        Compression::PackBits,
    ];

    fn roundtrip<T: TiffSample + std::fmt::Debug + PartialEq>(
        name: &str,
        array: ArrayD<T>,
        unwrap: impl Fn(TiffImage) -> Option<ArrayD<T>>,
    ) {
        for compression in ALL {
            let path = scratch(&format!("{name}-{compression:?}.tif"));
            write_tiff(&path, array.view(), &WriteOptions { compression }).unwrap();
            let back = unwrap(read_tiff(&path).unwrap()).expect("same sample type");
            assert_eq!(back, array, "{name} with {compression:?}");
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn every_sample_type_roundtrips_in_2d_and_3d_with_every_compression() {
        let a2 = |f: &dyn Fn(usize) -> u64| {
            Array2::from_shape_fn((7, 11), |(y, x)| f(y * 11 + x)).into_dyn()
        };
        let a3 = |f: &dyn Fn(usize) -> u64| {
            Array3::from_shape_fn((3, 5, 6), |(z, y, x)| f(z * 30 + y * 6 + x)).into_dyn()
        };
        for (dim, make) in [
            ("2d", &a2 as &dyn Fn(&dyn Fn(usize) -> u64) -> ArrayD<u64>),
            ("3d", &a3),
        ] {
            let big = make(&|i| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            roundtrip(&format!("u64-{dim}"), big, |t| match t {
                TiffImage::U64(a) => Some(a),
                _ => None,
            });
            let small = make(&|i| (i * 37 % 251) as u64);
            roundtrip(&format!("u8-{dim}"), small.mapv(|v| v as u8), |t| match t {
                TiffImage::U8(a) => Some(a),
                _ => None,
            });
            roundtrip(
                &format!("u16-{dim}"),
                small.mapv(|v| v as u16 * 250),
                |t| match t {
                    TiffImage::U16(a) => Some(a),
                    _ => None,
                },
            );
            roundtrip(
                &format!("u32-{dim}"),
                small.mapv(|v| v as u32 * 16_000_000),
                |t| match t {
                    TiffImage::U32(a) => Some(a),
                    _ => None,
                },
            );
            roundtrip(
                &format!("f32-{dim}"),
                small.mapv(|v| v as f32 / 7.0 - 3.5),
                |t| match t {
                    TiffImage::F32(a) => Some(a),
                    _ => None,
                },
            );
        }
    }

    #[test]
    fn a_non_standard_layout_is_written_in_logical_order() {
        let a = Array2::from_shape_fn((4, 6), |(y, x)| (y * 6 + x) as u16);
        let t = a.t();
        let path = scratch("transposed.tif");
        write_tiff(&path, t, &WriteOptions::default()).unwrap();
        let back = read_tiff(&path).unwrap().into_labels().unwrap();
        assert_eq!(back, t.mapv(u64::from).into_dyn());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn signed_images_read_when_non_negative_and_fail_otherwise() {
        let path = scratch("signed.tif");
        let write_i32 = |data: &[i32]| {
            let mut file = File::create(&path).unwrap();
            let mut enc = TiffEncoder::new(&mut file).unwrap();
            enc.write_image::<colortype::GrayI32>(3, 2, data).unwrap();
        };
        write_i32(&[0, 1, 2, 3, 4, 70_000]);
        let img = read_tiff(&path).unwrap();
        assert_eq!(img.sample_type(), SampleType::U32);
        assert_eq!(
            img.into_labels().unwrap().into_raw_vec_and_offset().0,
            vec![0, 1, 2, 3, 4, 70_000]
        );
        write_i32(&[0, 1, -2, 3, 4, 5]);
        let err = read_tiff(&path).unwrap_err().to_string();
        assert!(err.contains("signed.tif") && err.contains("-2"), "{err}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn corrupt_truncated_and_foreign_files_give_errors_naming_the_file() {
        let good = scratch("good.tif");
        let labels = Array2::from_shape_fn((64, 64), |(y, x)| ((y / 8) * 8 + x / 8) as u16);
        write_tiff(
            &good,
            labels.view(),
            &WriteOptions {
                compression: Compression::Lzw,
            },
        )
        .unwrap();
        let bytes = std::fs::read(&good).unwrap();

        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty.tif", vec![]),
            ("text.tif", b"this is not a tiff file at all".to_vec()),
            ("header-only.tif", bytes[..8].to_vec()),
            ("truncated.tif", bytes[..bytes.len() / 2].to_vec()),
            ("garbled.tif", {
                let mut b = bytes.clone();
                for v in b.iter_mut().skip(8).take(200) {
                    *v ^= 0xA5;
                }
                b
            }),
        ];
        for (name, content) in cases {
            let path = scratch(name);
            std::fs::write(&path, content).unwrap();
            let err = read_tiff(&path).expect_err(name).to_string();
            assert!(err.contains(name), "{name}: {err}");
            std::fs::remove_file(path).unwrap();
        }
        let missing = read_tiff(scratch("missing.tif")).unwrap_err().to_string();
        assert!(missing.contains("missing.tif"), "{missing}");
        std::fs::remove_file(good).unwrap();
    }

    #[test]
    fn label_ids_are_32_bit_and_ids_that_do_not_fit_are_named() {
        let small = TiffImage::U16(ndarray::arr2(&[[0u16, 7], [65535, 1]]).into_dyn());
        let ids = small.into_label_ids().unwrap();
        assert_eq!(
            ids.iter().copied().collect::<Vec<u32>>(),
            vec![0, 7, 65535, 1]
        );
        let fits = TiffImage::U64(ndarray::arr2(&[[u64::from(u32::MAX), 2]]).into_dyn());
        assert_eq!(fits.into_label_ids().unwrap()[[0, 0]], u32::MAX);
        let big = TiffImage::U64(ndarray::arr2(&[[3u64, 1 << 40]]).into_dyn());
        let err = big.into_label_ids().unwrap_err().to_string();
        assert!(err.contains("1099511627776"), "{err}");
        let float = TiffImage::F32(ndarray::arr2(&[[2.5f32]]).into_dyn());
        assert!(float.into_label_ids().is_err());
    }

    /// A little-endian, uncompressed one-page TIFF built by hand: `strips` are the pixel data
    /// (one per sample plane when `planar`), `sample_format` 1 unsigned or 3 float.
    fn hand_made_tiff(
        (w, h): (u32, u32),
        samples: u16,
        bits: u16,
        sample_format: u16,
        photometric: u16,
        planar: bool,
        strips: &[Vec<u8>],
    ) -> Vec<u8> {
        let n = strips.len() as u32;
        let entries = 11u32;
        let ifd_end = 8 + 2 + entries * 12 + 4;
        let arrays = ifd_end; // bits, formats (samples × u16), offsets, counts (n × u32)
        let bits_at = arrays;
        let formats_at = bits_at + 2 * u32::from(samples);
        let offsets_at = formats_at + 2 * u32::from(samples);
        let counts_at = offsets_at + 4 * n;
        let data_at = counts_at + 4 * n;
        let mut b: Vec<u8> = b"II*\0".to_vec();
        b.extend(8u32.to_le_bytes());
        b.extend((entries as u16).to_le_bytes());
        let mut entry = |tag: u16, kind: u16, count: u32, value: u32| {
            b.extend(tag.to_le_bytes());
            b.extend(kind.to_le_bytes());
            b.extend(count.to_le_bytes());
            b.extend(value.to_le_bytes());
        };
        let (short, long) = (3, 4);
        let many = |count: u32, at: u32, single: u32| if count == 1 { single } else { at };
        entry(256, long, 1, w);
        entry(257, long, 1, h);
        entry(
            258,
            short,
            samples.into(),
            many(samples.into(), bits_at, bits.into()),
        );
        entry(259, short, 1, 1);
        entry(262, short, 1, photometric.into());
        entry(273, long, n, many(n, offsets_at, data_at));
        entry(277, short, 1, samples.into());
        entry(278, long, 1, h);
        entry(279, long, n, many(n, counts_at, strips[0].len() as u32));
        entry(284, short, 1, if planar { 2 } else { 1 });
        entry(
            339,
            short,
            samples.into(),
            many(samples.into(), formats_at, sample_format.into()),
        );
        b.extend(0u32.to_le_bytes());
        for _ in 0..samples {
            b.extend(bits.to_le_bytes());
        }
        for _ in 0..samples {
            b.extend(sample_format.to_le_bytes());
        }
        let mut at = data_at;
        for s in strips {
            b.extend(at.to_le_bytes());
            at += s.len() as u32;
        }
        for s in strips {
            b.extend((s.len() as u32).to_le_bytes());
        }
        for s in strips {
            b.extend(s);
        }
        b
    }

    #[test]
    fn multi_sample_pages_read_as_channels_and_1_bit_masks_as_0_1() {
        // (3, 2, 3) f32 channels: value = 100·c + 10·y + x.
        let value = |c: usize, y: usize, x: usize| (100 * c + 10 * y + x) as f32;
        let plane = |c: usize| -> Vec<u8> {
            (0..6)
                .flat_map(|i| value(c, i / 3, i % 3).to_le_bytes())
                .collect()
        };
        let expected: Vec<f32> = (0..18).map(|i| value(i / 6, (i % 6) / 3, i % 3)).collect();
        // What tifffile writes for a (3, H, W) float32 array: photometric RGB, planar.
        let planar = hand_made_tiff((3, 2), 3, 32, 3, 2, true, &[plane(0), plane(1), plane(2)]);
        // Interleaved samples, as (H, W, 3) arrays are written.
        let interleaved: Vec<u8> = (0..6)
            .flat_map(|i| (0..3).flat_map(move |c| value(c, i / 3, i % 3).to_le_bytes()))
            .collect();
        let chunky = hand_made_tiff((3, 2), 3, 32, 3, 2, false, &[interleaved]);
        for (name, bytes) in [("planar.tif", planar), ("chunky.tif", chunky)] {
            let path = scratch(name);
            std::fs::write(&path, bytes).unwrap();
            match read_tiff(&path).expect(name) {
                TiffImage::F32(a) => {
                    assert_eq!(a.shape(), &[3, 2, 3], "{name}");
                    assert_eq!(a.iter().copied().collect::<Vec<_>>(), expected, "{name}");
                }
                other => panic!("{name}: {:?}", other.sample_type()),
            }
            std::fs::remove_file(path).unwrap();
        }
        // A 1-bit 10×2 mask: rows of two bytes, most significant bit first.
        let rows = vec![0b1000_0001, 0b1100_0000, 0b0000_0000, 0b0100_0000];
        let mask = hand_made_tiff((10, 2), 1, 1, 1, 1, false, &[rows]);
        let path = scratch("mask.tif");
        std::fs::write(&path, mask).unwrap();
        let m = read_tiff(&path).unwrap();
        assert_eq!(m.shape(), &[2, 10]);
        assert_eq!(
            m.into_label_ids()
                .unwrap()
                .iter()
                .copied()
                .collect::<Vec<u32>>(),
            vec![1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        std::fs::remove_file(path).unwrap();
    }

    /// A full disk: the temporary file the write goes through is made a link to `/dev/full`.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_full_disk_says_cannot_write_and_keeps_the_old_file() {
        if !Path::new("/dev/full").exists() {
            eprintln!("skipped: no /dev/full");
            return;
        }
        let path = scratch("full.tif");
        std::fs::write(&path, b"old").unwrap();
        let tmp = path.with_file_name(format!(".full.tif.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
        let image = ndarray::Array2::<u16>::zeros((64, 64));
        let err = write_tiff(&path, image.view(), &WriteOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("full.tif: cannot write") && err.contains("No space left"),
            "{err}"
        );
        assert!(!err.contains("readable"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert!(!tmp.exists());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_page_declaring_more_than_memory_is_refused_before_decoding() {
        let huge = hand_made_tiff(
            (4_000_000_000, 4_000_000_000),
            1,
            32,
            3,
            1,
            false,
            &[vec![0; 16]],
        );
        let path = scratch("huge.tif");
        std::fs::write(&path, huge).unwrap();
        let err = read_tiff(&path).unwrap_err().to_string();
        assert!(
            err.contains("huge.tif") && err.contains("page 0") && err.contains("GiB"),
            "{err}"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn colour_models_that_are_not_channels_are_refused_with_a_reason() {
        let path = scratch("cmyk.tif");
        {
            let mut file = File::create(&path).unwrap();
            let mut enc = TiffEncoder::new(&mut file).unwrap();
            enc.write_image::<colortype::CMYK8>(2, 2, &[0u8; 16])
                .unwrap();
        }
        let err = read_tiff(&path).unwrap_err().to_string();
        assert!(err.contains("cmyk.tif") && err.contains("CMYK"), "{err}");
        std::fs::remove_file(&path).unwrap();
        // RGB reads as three channels.
        {
            let mut file = File::create(&path).unwrap();
            let mut enc = TiffEncoder::new(&mut file).unwrap();
            let px: Vec<u8> = (0..12).collect();
            enc.write_image::<colortype::RGB8>(2, 2, &px).unwrap();
        }
        assert_eq!(samples_per_pixel(&path).unwrap(), 3);
        match read_tiff(&path).unwrap() {
            TiffImage::U8(a) => {
                assert_eq!(a.shape(), &[3, 2, 2]);
                assert_eq!(
                    a.iter().copied().collect::<Vec<u8>>(),
                    vec![0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11]
                );
            }
            other => panic!("{:?}", other.sample_type()),
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn arrays_a_tiff_cannot_hold_are_refused() {
        let path = scratch("bad-shape.tif");
        let one_d = ndarray::Array1::<u8>::zeros(5);
        assert!(write_tiff(&path, one_d.view(), &WriteOptions::default()).is_err());
        let empty = Array2::<u8>::zeros((0, 5));
        assert!(write_tiff(&path, empty.view(), &WriteOptions::default()).is_err());
        assert!(!path.exists());
    }

    #[test]
    fn float_labels_convert_only_when_integral() {
        let ok = TiffImage::F32(Array2::from_elem((2, 2), 3.0f32).into_dyn());
        assert_eq!(ok.into_labels().unwrap()[[1, 1]], 3);
        let bad = TiffImage::F32(Array2::from_elem((2, 2), 0.5f32).into_dyn());
        assert!(bad.into_labels().is_err());
        let nan = TiffImage::F32(Array2::from_elem((2, 2), f32::NAN).into_dyn());
        assert!(nan.into_labels().is_err());
    }
}
