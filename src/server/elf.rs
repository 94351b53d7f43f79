//! Just enough ELF to tell whether a binary runs without a dynamic loader: the one-liner hands
//! this host's binary to newcomers, and one whose interpreter (and libc) lives in this host's
//! `/nix/store` runs nowhere else. Pure; reads the file header and the program headers only.

/// How a binary gets loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Linkage {
    /// No program interpreter: the kernel runs it as it is (static, or static-pie).
    Static,
    /// Needs this interpreter (`PT_INTERP`), e.g. `/nix/store/…-glibc-…/lib/ld-linux-x86-64.so.2`.
    Dynamic { interpreter: String },
}

/// What the ELF header says about a binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfFacts {
    /// `e_machine` (62: x86-64, 183: aarch64).
    pub machine: u16,
    pub linkage: Linkage,
}

/// Why a file is not a binary the one-liner can describe.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian ELF executable")]
    Unsupported,
    #[error("its program headers lie outside the first {0} bytes read")]
    Truncated(usize),
}

/// The bytes [`inspect`] needs at most: the program headers of any real executable sit right
/// after the 64-byte file header.
pub const HEADER_BYTES: usize = 64 * 1024;

const PT_INTERP: u32 = 3;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?)).ok()
}

/// Reads the file header and program headers from `head` (the file's first bytes, at most
/// [`HEADER_BYTES`] needed).
pub fn inspect(head: &[u8]) -> Result<ElfFacts, ElfError> {
    if head.get(..4) != Some(b"\x7fELF") {
        return Err(ElfError::NotElf);
    }
    // ELFCLASS64, ELFDATA2LSB, and a file header that is all there.
    if head.get(4) != Some(&2) || head.get(5) != Some(&1) || head.len() < 64 {
        return Err(ElfError::Unsupported);
    }
    let truncated = || ElfError::Truncated(head.len());
    let machine = u16_at(head, 18).ok_or(ElfError::Unsupported)?;
    let phoff = u64_at(head, 32).ok_or(ElfError::Unsupported)?;
    let phentsize = usize::from(u16_at(head, 54).ok_or(ElfError::Unsupported)?);
    let phnum = usize::from(u16_at(head, 56).ok_or(ElfError::Unsupported)?);
    if phentsize < 56 {
        return Err(ElfError::Unsupported);
    }
    for i in 0..phnum {
        let ph = phoff.checked_add(i * phentsize).ok_or(ElfError::Unsupported)?;
        let p_type = u32_at(head, ph).ok_or_else(truncated)?;
        if p_type == PT_INTERP {
            let offset = u64_at(head, ph + 8).ok_or_else(truncated)?;
            let size = u64_at(head, ph + 32).ok_or_else(truncated)?;
            let end = offset.checked_add(size).ok_or(ElfError::Unsupported)?;
            let raw = head.get(offset..end).ok_or_else(truncated)?;
            let interpreter = String::from_utf8_lossy(raw.split(|&c| c == 0).next().unwrap_or(raw)).into_owned();
            return Ok(ElfFacts {
                machine,
                linkage: Linkage::Dynamic { interpreter },
            });
        }
    }
    Ok(ElfFacts {
        machine,
        linkage: Linkage::Static,
    })
}

/// The `e_machine` of the architecture this binary was built for, where the one-liner knows it.
pub fn this_machine() -> Option<u16> {
    match std::env::consts::ARCH {
        "x86_64" => Some(62),
        "aarch64" => Some(183),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 file header with `phdrs` program headers of (type, offset, size).
    fn elf(phdrs: &[(u32, u64, u64)], tail: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for &(t, off, size) in phdrs {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            ph[8..16].copy_from_slice(&off.to_le_bytes());
            ph[32..40].copy_from_slice(&size.to_le_bytes());
            b.extend(ph);
        }
        b.extend_from_slice(tail);
        b
    }

    #[test]
    fn tells_static_from_dynamic_and_names_the_interpreter() {
        let interp = b"/nix/store/x-glibc/lib/ld-linux-x86-64.so.2\0";
        let at = 64 + 2 * 56;
        let dynamic = elf(&[(6, 0, 0), (PT_INTERP, at as u64, interp.len() as u64)], interp);
        assert_eq!(
            inspect(&dynamic),
            Ok(ElfFacts {
                machine: 62,
                linkage: Linkage::Dynamic {
                    interpreter: "/nix/store/x-glibc/lib/ld-linux-x86-64.so.2".into()
                }
            })
        );
        assert_eq!(
            inspect(&elf(&[(1, 0, 0), (6, 0, 0)], b"")),
            Ok(ElfFacts {
                machine: 62,
                linkage: Linkage::Static
            })
        );
    }

    #[test]
    fn refuses_what_is_not_a_64_bit_elf_and_headers_it_cannot_see() {
        assert_eq!(inspect(b"#!/bin/sh\n"), Err(ElfError::NotElf));
        let mut e32 = elf(&[], b"");
        e32[4] = 1;
        assert_eq!(inspect(&e32), Err(ElfError::Unsupported));
        let mut far = elf(&[(PT_INTERP, 1 << 40, 16)], b"");
        assert_eq!(inspect(&far), Err(ElfError::Truncated(far.len())));
        far.truncate(70);
        assert_eq!(inspect(&far), Err(ElfError::Truncated(70)));
    }

    #[test]
    fn this_test_binary_is_what_cargo_built() {
        // `cargo test` links dynamically against the system's glibc: the loader is named.
        let me = std::fs::read(std::env::current_exe().expect("exe")).expect("read");
        let facts = inspect(&me[..HEADER_BYTES.min(me.len())]).expect("ELF");
        assert_eq!(Some(facts.machine), this_machine());
    }
}
