//! The throwaway copy of the image and the login key it gets.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;

use super::process::run_bounded;
use super::vm::{NETWORK_CMDLINE, TEST_CMDLINE};
use super::{KeyVia, Run};
use crate::artifacts::KERNEL_CMDLINE;
use crate::image::Image;

impl Run<'_> {
    /// Copies the image, makes the key pair and puts the public key where
    /// `key_via` says; returns the kernel command line.
    pub(super) fn prepare(&mut self) -> Result<String, String> {
        let copy = self.work.copy();
        let mut cp = Command::new("cp");
        cp.arg("--sparse=always")
            .arg(&self.options.image)
            .arg(&copy);
        let ran = run_bounded(cp, Duration::from_secs(600))?;
        ran.expect_success("copying the image")?;

        let key = self.work.key();
        let mut keygen = Command::new("ssh-keygen");
        keygen
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-boot", "-f"])
            .arg(&key);
        run_bounded(keygen, Duration::from_secs(60))?.expect_success("ssh-keygen")?;
        let public = fs::read_to_string(key.with_extension("pub"))
            .map_err(|e| format!("{}: {e}", key.with_extension("pub").display()))?;
        let public = public.trim().to_string();

        let account = Account::find(&copy, &self.options.user)?;
        let mut cmdline = format!("{KERNEL_CMDLINE} {NETWORK_CMDLINE} {TEST_CMDLINE}");
        match self.options.key_via {
            KeyVia::Inject => inject_key(&copy, &account, &key.with_extension("pub"), &public)?,
            KeyVia::Cmdline => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(&public);
                cmdline.push_str(&format!(" kiln.authorized_key={encoded}"));
            }
        }
        Ok(cmdline)
    }
}

/// A user's entry in the image's /etc/passwd.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Account {
    uid: u32,
    gid: u32,
    home: String,
}

impl Account {
    fn find(image: &Path, user: &str) -> Result<Account, String> {
        let passwd = Image::open(image)
            .and_then(|i| i.read("/etc/passwd"))
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        Account::parse(&String::from_utf8_lossy(&passwd), user)
            .ok_or_else(|| format!("the image's /etc/passwd has no user `{user}`"))
    }

    fn parse(passwd: &str, user: &str) -> Option<Account> {
        passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 || f[0] != user {
                return None;
            }
            Some(Account {
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
    }
}

/// Writes `public` as the user's only authorized key into the copy, owned
/// by the user, with sshd's modes (debugfs: no mount, no root needed).
fn inject_key(
    copy: &Path,
    account: &Account,
    public_file: &Path,
    public: &str,
) -> Result<(), String> {
    let home = account.home.trim_end_matches('/');
    let ssh_dir = format!("{home}/.ssh");
    let keys = format!("{ssh_dir}/authorized_keys");
    for p in [&ssh_dir, &keys] {
        check_script_path(p)
            .map_err(|why| format!("cannot write the key to the image's `{p}` ({why})"))?;
    }
    let host_file = public_file
        .to_str()
        .filter(|p| check_script_path(p).is_ok())
        .ok_or_else(|| format!("{}: not a path debugfs can read", public_file.display()))?;
    let image = Image::open(copy).map_err(|e| e.to_string())?;
    let exists = |path: &str| -> Result<bool, String> {
        Ok(image.stat(path).map_err(|e| e.to_string())?.is_some())
    };
    let mut script = String::new();
    if !exists(&ssh_dir)? {
        script.push_str(&format!("mkdir \"{ssh_dir}\"\n"));
    }
    if exists(&keys)? {
        script.push_str(&format!("rm \"{keys}\"\n"));
    }
    script.push_str(&format!("write \"{host_file}\" \"{keys}\"\n"));
    for (path, mode) in [(&ssh_dir, "040700"), (&keys, "0100600")] {
        script.push_str(&format!(
            "sif \"{path}\" uid {uid}\nsif \"{path}\" gid {gid}\nsif \"{path}\" mode {mode}\n",
            uid = account.uid,
            gid = account.gid
        ));
    }
    let script_file = public_file.with_extension("debugfs");
    fs::write(&script_file, &script).map_err(|e| format!("{}: {e}", script_file.display()))?;
    let mut cmd = Command::new("debugfs");
    cmd.arg("-w").arg("-f").arg(&script_file).arg(copy);
    let ran = run_bounded(cmd, Duration::from_secs(60))?;
    let _ = fs::remove_file(&script_file);
    ran.expect_success("writing the key with debugfs -w")?;
    // debugfs reports its errors but exits 0: read the result back.
    let written = Image::open(copy)
        .and_then(|i| i.read(&keys))
        .ok()
        .flatten()
        .unwrap_or_default();
    if String::from_utf8_lossy(&written).trim() != public {
        return Err(format!(
            "writing {keys} into the copy with debugfs failed:\n{}",
            ran.stderr.trim()
        ));
    }
    Ok(())
}

/// The longest path kiln writes into a debugfs script (its lines are cut at 8 KiB).
const MAX_SCRIPT_PATH: usize = 1024;

/// Checks a path before it goes into a debugfs script. The home directory
/// comes from the image's /etc/passwd, so it is untrusted: debugfs splits
/// long lines and runs a line starting with `!` through the host's shell.
/// Only an absolute path of plain characters (letters, digits, `._+@-/`),
/// without `..`, and at most [`MAX_SCRIPT_PATH`] bytes passes.
fn check_script_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("not absolute".into());
    }
    if path.len() > MAX_SCRIPT_PATH {
        return Err(format!("longer than {MAX_SCRIPT_PATH} bytes"));
    }
    if let Some(c) = path
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._+@-/".contains(*c)))
    {
        return Err(format!("it has the character {c:?}"));
    }
    if path.split('/').any(|part| part == "..") {
        return Err("it has `..`".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_entries_give_uid_gid_and_home() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      agentx:x:1:1::/nope:/bin/sh\n\
                      agent:x:1000:1001::/home/agent:/bin/bash\n";
        assert_eq!(
            Account::parse(passwd, "agent"),
            Some(Account {
                uid: 1000,
                gid: 1001,
                home: "/home/agent".into()
            })
        );
        assert_eq!(Account::parse(passwd, "nobody"), None);
        assert_eq!(
            Account::parse("agent:x:oops:1::/h:/bin/sh\n", "agent"),
            None
        );
    }

    #[test]
    fn only_plain_paths_reach_a_debugfs_script() {
        assert_eq!(
            check_script_path("/home/agent/.ssh/authorized_keys"),
            Ok(())
        );
        assert_eq!(check_script_path("/var/lib/build-user_1@x+y"), Ok(()));
        let long = format!("/home/{}", "a".repeat(9000));
        for bad in [
            "/home/a\r!reboot",
            "/home/a\n!id > /tmp/pwned",
            "/home/$(id)",
            "/home/a b",
            "/home/\"x",
            "/home/../../etc",
            "home/agent",
            long.as_str(),
        ] {
            assert!(check_script_path(bad).is_err(), "{bad:?} passed");
        }
    }
}
