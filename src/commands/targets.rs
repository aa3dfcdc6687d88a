//! `dbh targets [--json]`.

use super::{out, Context};
use crate::target::Boot;
use crate::Error;

pub fn run(ctx: &Context, json: bool) -> Result<(), Error> {
    let targets = ctx.targets()?;
    if json {
        let list: Vec<_> = targets.iter().collect();
        let text = serde_json::to_string_pretty(&list).expect("targets serialize");
        return out(&(text + "\n"));
    }
    let mut text = format!(
        "{:<10} {:<8} {:<32} {:<22} {:<24} {}\n",
        "TARGET", "ARCH", "CHOST", "QEMU", "BOOT", "PROFILE"
    );
    for t in targets.iter() {
        let boot = match &t.boot {
            Boot::Uefi { efi_arch, .. } => format!("UEFI + UKI (BOOT{efi_arch})"),
            Boot::Direct => "direct kernel (no UEFI)".to_string(),
        };
        text.push_str(&format!(
            "{:<10} {:<8} {:<32} {:<22} {:<24} {}\n",
            t.name, t.arch, t.chost, t.qemu.binary, boot, t.profile
        ));
    }
    for t in targets.iter().filter(|t| !t.is_uefi()) {
        text.push_str(&format!(
            "note: {}: QEMU's `{}` machine has no UEFI firmware, so dbh boots its kernel and initramfs directly (no UKI)\n",
            t.name, t.qemu.machine
        ));
    }
    out(&text)
}
