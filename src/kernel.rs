//! Kernels for Firecracker: the distribution's compressed `vmlinuz` (an x86
//! bzImage) turned into the uncompressed ELF `vmlinux` that Firecracker loads.
//!
//! The method of the kernel tree's `scripts/extract-vmlinux`, without its
//! guessing: the bzImage header (boot protocol 2.08+) says where the
//! compressed payload is; its magic says how it is compressed (gzip, xz,
//! lzma, zstd or lz4 legacy — what Debian and Ubuntu use); the result must be
//! an ELF file. qemu's `microvm` boots either form.

use std::io::Read;

/// Why a kernel could not be turned into a vmlinux.
#[derive(Debug, thiserror::Error)]
#[error("kernel image: {0}")]
pub struct KernelError(String);

const ELF_MAGIC: &[u8] = b"\x7fELF";

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The compressed payload inside a bzImage.
fn payload(image: &[u8]) -> Result<&[u8], KernelError> {
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err(KernelError(
            "not an x86 bzImage (no `HdrS` boot header)".into(),
        ));
    }
    let version = u16_at(image, 0x206).unwrap_or(0);
    if version < 0x208 {
        return Err(KernelError(format!(
            "boot protocol {}.{} is older than 2.08 and does not say where its payload is",
            version >> 8,
            version & 0xff
        )));
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let offset = (setup_sects + 1) * 512 + u32_at(image, 0x248).unwrap_or(0) as usize;
    let length = u32_at(image, 0x24c).unwrap_or(0) as usize;
    image
        .get(offset..offset + length)
        .ok_or_else(|| KernelError("payload lies outside the file".into()))
}

/// Decompresses the Linux kernel's "lz4 legacy" format: a magic, then blocks
/// each prefixed by its compressed size (the kernel appends its own size last).
fn lz4_legacy(mut data: &[u8]) -> Result<Vec<u8>, KernelError> {
    const MAGIC: u32 = 0x184C_2102;
    const BLOCK: usize = 8 << 20;
    let mut out = Vec::new();
    while data.len() >= 4 {
        let size = u32_at(data, 0).unwrap_or(0) as usize;
        data = &data[4..];
        if size == MAGIC as usize {
            continue;
        }
        if size == 0 || size > data.len() {
            break; // the trailing size field, or the end
        }
        let block = lz4_flex::block::decompress(&data[..size], BLOCK)
            .or_else(|_| {
                // The last block is usually shorter than BLOCK: decompress into a buffer.
                let mut buf = vec![0u8; BLOCK];
                lz4_flex::block::decompress_into(&data[..size], &mut buf).map(|n| {
                    buf.truncate(n);
                    buf
                })
            })
            .map_err(|e| KernelError(format!("lz4: {e}")))?;
        out.extend_from_slice(&block);
        data = &data[size..];
    }
    Ok(out)
}

/// Decompresses a kernel payload by its magic.
fn decompress(data: &[u8]) -> Result<Vec<u8>, KernelError> {
    let mut out = Vec::new();
    let fail = |what: &str, e: &dyn std::fmt::Display| KernelError(format!("{what}: {e}"));
    if data.starts_with(&[0x1f, 0x8b]) {
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .map_err(|e| fail("gzip", &e))?;
    } else if data.starts_with(b"\xfd7zXZ\x00") {
        lzma_rs::xz_decompress(&mut std::io::BufReader::new(data), &mut out)
            .map_err(|e| fail("xz", &e))?;
    } else if data.starts_with(&[0x5d, 0x00, 0x00]) {
        lzma_rs::lzma_decompress(&mut std::io::BufReader::new(data), &mut out)
            .map_err(|e| fail("lzma", &e))?;
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        ruzstd::decoding::StreamingDecoder::new(data)
            .map_err(|e| fail("zstd", &e))?
            .read_to_end(&mut out)
            .map_err(|e| fail("zstd", &e))?;
    } else if data.starts_with(&[0x02, 0x21, 0x4c, 0x18]) {
        out = lz4_legacy(data)?;
    } else {
        let head: Vec<String> = data.iter().take(6).map(|b| format!("{b:02x}")).collect();
        return Err(KernelError(format!(
            "unknown compression (payload starts {}); kiln reads gzip, xz, lzma, zstd and lz4",
            head.join(" ")
        )));
    }
    Ok(out)
}

/// The uncompressed ELF kernel in `image` (a bzImage, or already an ELF).
pub fn to_vmlinux(image: &[u8]) -> Result<Vec<u8>, KernelError> {
    if image.starts_with(ELF_MAGIC) {
        return Ok(image.to_vec());
    }
    let elf = decompress(payload(image)?)?;
    if !elf.starts_with(ELF_MAGIC) {
        return Err(KernelError(
            "the decompressed payload is not an ELF file".into(),
        ));
    }
    Ok(elf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal bzImage: boot header (protocol 2.15) and `payload` after one setup sector.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 1024];
        img[0x1f1] = 1;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(payload);
        img.extend_from_slice(b"trailer");
        img
    }

    fn elf() -> Vec<u8> {
        let mut e = ELF_MAGIC.to_vec();
        e.extend((0..200_000u32).map(|i| (i % 251) as u8));
        e
    }

    #[test]
    fn every_supported_compression_round_trips() {
        let elf = elf();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).unwrap();
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut std::io::BufReader::new(&elf[..]), &mut xz).unwrap();
        let mut lzma = Vec::new();
        lzma_rs::lzma_compress(&mut std::io::BufReader::new(&elf[..]), &mut lzma).unwrap();
        let zstd = ruzstd::encoding::compress_to_vec(
            &elf[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let block = lz4_flex::block::compress(&elf);
        let mut lz4 = 0x184C_2102u32.to_le_bytes().to_vec();
        lz4.extend((block.len() as u32).to_le_bytes());
        lz4.extend(&block);
        lz4.extend((elf.len() as u32).to_le_bytes());
        for (name, payload) in [
            ("gzip", gz.finish().unwrap()),
            ("xz", xz),
            ("lzma", lzma),
            ("zstd", zstd),
            ("lz4", lz4),
        ] {
            assert_eq!(to_vmlinux(&bzimage(&payload)).unwrap(), elf, "{name}");
        }
        assert_eq!(to_vmlinux(&elf).unwrap(), elf);
    }

    #[test]
    fn bad_images_are_refused() {
        assert!(to_vmlinux(b"not a kernel at all")
            .unwrap_err()
            .to_string()
            .contains("bzImage"));
        let e = to_vmlinux(&bzimage(b"\x00\x01\x02\x03 plain")).unwrap_err();
        assert!(e.to_string().contains("unknown compression"), "{e}");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"no elf here").unwrap();
        let e = to_vmlinux(&bzimage(&gz.finish().unwrap())).unwrap_err();
        assert!(e.to_string().contains("not an ELF"), "{e}");
    }
}
