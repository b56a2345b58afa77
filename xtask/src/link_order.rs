//! The agent's code layout in `dist`: the functions a running agent uses, first and
//! together.
//!
//! Each fault on the agent's binary maps a whole page-cache folio (64 KiB on the CI
//! machine's kernel), and the code an agent runs is spread over the whole text when the
//! linker lays it out by itself, so an idle agent kept nearly all of its code resident.
//! [`PROFILE`] lists the functions a running agent touched, measured by
//! `scripts/profile-agent-code.sh` (docs/benchmarks.md, "Memory: what the agent's RSS is
//! made of"). It names them without what changes from build to build
//! ([`stable_name`]); `dist` turns it into the built binary's own symbol names
//! ([`order_file`]), writes them where the agent's build script points lld
//! (`SLUICE_LINK_ORDER`, `--symbol-ordering-file`), relinks the agent when they changed,
//! and checks that the listed functions ended up together ([`packing`]).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The profile: one function per line, in the order to lay them out.
pub const PROFILE: &str = "agent/link-order.txt";

/// A function symbol of a built binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub addr: u64,
    pub size: u64,
    pub name: String,
}

/// `name` without what differs between two builds of the same code: the hash of a
/// legacy-mangled Rust symbol (`17h` and 16 hex digits before its closing `E`), and the
/// numeric suffix LTO gives a local copy (`.1534`, `.llvm.4417…`). Everything else,
/// the generic arguments of v0-mangled symbols and C suffixes such as `.cold` included,
/// is kept.
pub fn stable_name(name: &str) -> String {
    let mut name = name;
    if let Some((stem, n)) = name.rsplit_once('.')
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
    {
        name = stem.strip_suffix(".llvm").unwrap_or(stem);
    }
    let b = name.as_bytes();
    // `…17h<16 hex>E` at the end.
    if b.len() >= 20 && name.ends_with('E') {
        let hash = &b[b.len() - 20..b.len() - 1];
        if hash.starts_with(b"17h") && hash[3..].iter().all(u8::is_ascii_hexdigit) {
            return format!("{}E", &name[..name.len() - 20]);
        }
    }
    name.to_owned()
}

/// The profile's names: one per line; blank lines and `#` comments are skipped.
pub fn read_profile(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned).collect()
}

/// The symbol-ordering file for a binary with `symbols`: for each name of `profile` in
/// turn, every symbol with that stable name (generic copies share one), in address
/// order, each once.
pub fn order_file(profile: &[String], symbols: &[Symbol]) -> String {
    let mut by_name: HashMap<String, Vec<&Symbol>> = HashMap::new();
    for s in symbols {
        by_name.entry(stable_name(&s.name)).or_default().push(s);
    }
    let mut out = String::new();
    for name in profile {
        if let Some(mut found) = by_name.remove(name) {
            found.sort_by_key(|s| s.addr);
            for s in found {
                out.push_str(&s.name);
                out.push('\n');
            }
        }
    }
    out
}

/// How well the functions of `order` (an [`order_file`]) are laid out together: their
/// total size, and the share of it that lies within one and a half times that size from
/// the first of them. Laid out first, nearly all of it does (what does not is in
/// glibc's own sections, such as `__libc_freeres_fn`); left where the linker puts
/// them, they are spread over the whole text.
pub fn packing(order: &str, symbols: &[Symbol]) -> (u64, f64) {
    let wanted: std::collections::HashSet<&str> = order.lines().collect();
    let listed: Vec<&Symbol> = symbols.iter().filter(|s| wanted.contains(s.name.as_str())).collect();
    let size: u64 = listed.iter().map(|s| s.size).sum();
    let Some(first) = listed.iter().map(|s| s.addr).min() else { return (0, 0.0) };
    let window_end = first + size + size / 2;
    let inside: u64 = listed.iter().filter(|s| s.addr + s.size <= window_end).map(|s| s.size).sum();
    (size, inside as f64 / size.max(1) as f64)
}

/// The function symbols (`nm` types `t`, `T`, `W`) of the ELF file at `path`, in
/// address order.
pub fn function_symbols(path: &Path) -> Result<Vec<Symbol>> {
    let out = Command::new("nm")
        .args(["--numeric-sort", "--print-size", "--defined-only"])
        .arg(path)
        .output()
        .context("running nm (binutils)")?;
    if !out.status.success() {
        bail!("nm {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(parse_nm(&String::from_utf8_lossy(&out.stdout)))
}

/// `nm --numeric-sort --print-size` lines (`ADDR SIZE TYPE NAME`) of functions.
fn parse_nm(text: &str) -> Vec<Symbol> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (addr, size, kind, name) = (f.next()?, f.next()?, f.next()?, f.next()?);
            if !matches!(kind, "t" | "T" | "W") {
                return None;
            }
            let addr = u64::from_str_radix(addr, 16).ok()?;
            let size = u64::from_str_radix(size, 16).ok()?;
            Some(Symbol { addr, size, name: name.to_owned() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(addr: u64, size: u64, name: &str) -> Symbol {
        Symbol { addr, size, name: name.into() }
    }

    #[test]
    fn stable_names_drop_only_what_changes_between_builds() {
        assert_eq!(
            stable_name("_ZN12sluice_agent11start_parts17h1dc34832406c99ccE"),
            "_ZN12sluice_agent11start_partsE"
        );
        assert_eq!(
            stable_name(
                "_ZN12sluice_agent4main28_$u7b$$u7b$closure$u7d$$u7d$17hdb2a74927fc573b9E.llvm.15186761219091009872"
            ),
            "_ZN12sluice_agent4main28_$u7b$$u7b$closure$u7d$$u7d$E"
        );
        // C and v0-mangled names have no hash to drop.
        assert_eq!(stable_name("aws_lc_0_47_0_aes_gcm_encrypt_avx512"), "aws_lc_0_47_0_aes_gcm_encrypt_avx512");
        assert_eq!(stable_name("_RNvMNtCsgEmfK2I1SDS_4core3stre4trim"), "_RNvMNtCsgEmfK2I1SDS_4core3stre4trim");
        // Not a hash: too short, or not hex.
        assert_eq!(stable_name("_ZN3foo17hxyzE"), "_ZN3foo17hxyzE");
        assert_eq!(stable_name("_ZN3foo3bar17hzzzzzzzzzzzzzzzzE"), "_ZN3foo3bar17hzzzzzzzzzzzzzzzzE");
        assert_eq!(stable_name("f.llvm.x1"), "f.llvm.x1");
        // LTO's numbered local copies.
        assert_eq!(
            stable_name("_RNvNtCslNYArtu3iFV_5alloc5boxed14box_new_uninit.1534"),
            "_RNvNtCslNYArtu3iFV_5alloc5boxed14box_new_uninit"
        );
        assert_eq!(
            stable_name(
                "_ZN62_$LT$asn1_rs..header..Header$u20$as$u20$core..clone..Clone$GT$5clone17h35cce43ac921d9c3E.4777"
            ),
            "_ZN62_$LT$asn1_rs..header..Header$u20$as$u20$core..clone..Clone$GT$5cloneE"
        );
        assert_eq!(stable_name("aws_lc_0_47_0_bn_rand_secret_range.cold"), "aws_lc_0_47_0_bn_rand_secret_range.cold");
    }

    #[test]
    fn the_order_follows_the_profile_with_every_copy_of_a_name() {
        let symbols = [
            sym(0x100, 8, "cold"),
            sym(0x200, 8, "_ZN1a4poll17h00000000000000aaE"),
            sym(0x300, 8, "hot_c"),
            sym(0x150, 8, "_ZN1a4poll17h00000000000000bbE.llvm.7"),
        ];
        let profile = read_profile("# comment\nhot_c\n\n_ZN1a4pollE\nnot_in_this_build\n");
        assert_eq!(
            order_file(&profile, &symbols),
            "hot_c\n_ZN1a4poll17h00000000000000bbE.llvm.7\n_ZN1a4poll17h00000000000000aaE\n"
        );
        // A name listed twice is laid out once.
        let twice = read_profile("hot_c\nhot_c\n");
        assert_eq!(order_file(&twice, &symbols), "hot_c\n");
    }

    #[test]
    fn packing_tells_laid_out_from_scattered() {
        let packed = [sym(0x1000, 0x100, "a"), sym(0x1100, 0x100, "b"), sym(0x1200, 0x5000, "cold")];
        assert_eq!(packing("a\nb\n", &packed), (0x200, 1.0));
        let scattered = [sym(0x1000, 0x100, "a"), sym(0x1100, 0x5000, "cold"), sym(0x6100, 0x100, "b")];
        assert_eq!(packing("a\nb\n", &scattered), (0x200, 0.5));
        assert_eq!(packing("", &packed), (0, 0.0));
    }

    #[test]
    fn reads_nm_function_lines() {
        let nm = "0000000000001000 0000000000000010 T main\n\
                  0000000000002000 0000000000000020 r some_table\n\
                  0000000000003000 t no_size\n\
                  0000000000004000 0000000000000008 W weak_fn\n";
        assert_eq!(parse_nm(nm), [sym(0x1000, 0x10, "main"), sym(0x4000, 8, "weak_fn")]);
    }
}
