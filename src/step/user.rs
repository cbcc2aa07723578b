//! `user`: creates a login account the way an administrator would — with the
//! root's own `useradd` — plus optional passwordless sudo (a `visudo`-checked
//! drop-in, mode 0440), SSH `authorized_keys` (public keys from a file next to
//! the recipe; owner-only modes) and systemd lingering.
//!
//! `keys_from: [cmdline, mmds]` adds per-VM keys without rebaking the image: a
//! first-boot unit, `kiln-authorized-keys.service`, runs before sshd and
//! appends the keys it finds to the user's `authorized_keys`:
//! * `cmdline`: each `kiln.authorized_key=<base64 of a public key line>` on the
//!   kernel command line;
//! * `mmds`: Firecracker's metadata service at 169.254.169.254 (IMDSv2 flow: a
//!   session token from `PUT /latest/api/token`, then
//!   `GET /latest/meta-data/public-keys/0/openssh-key`).
//!
//! Accounts other steps made (e.g. `sshd`'s) are left alone: the step adds one
//! entry and fails clearly if the name, uid or gid is already taken.

use serde::{Deserialize, Serialize};

use super::{Kind, StepContext, StepError};
use crate::checks::{Expect, Homes};
use crate::digest::KeyEncoder;
use crate::fields::{is_account_name, ImagePath, Owner, Principal, RecipeRelPath};
use crate::image::FileType;
use crate::sandbox::Action;

/// The `user:` step fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "UserFields")]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: ImagePath,
    pub shell: ImagePath,
    pub groups: Vec<String>,
    pub sudo_nopasswd: bool,
    pub authorized_keys: Option<RecipeRelPath>,
    pub linger: bool,
    /// Where per-VM keys come from at boot (`cmdline`, `mmds`).
    pub keys_from: Vec<KeySource>,
}

/// A place a VM finds its SSH keys at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeySource {
    Cmdline,
    Mmds,
}

impl KeySource {
    /// How the step key spells it (written out, so that no derive can change a key).
    fn key_name(&self) -> &'static str {
        match self {
            KeySource::Cmdline => "Cmdline",
            KeySource::Mmds => "Mmds",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserFields {
    name: String,
    uid: u32,
    gid: Option<u32>,
    home: Option<ImagePath>,
    shell: Option<ImagePath>,
    #[serde(default)]
    groups: Vec<String>,
    sudo: Option<String>,
    authorized_keys: Option<RecipeRelPath>,
    #[serde(default)]
    linger: bool,
    #[serde(default)]
    keys_from: Vec<KeySource>,
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if is_account_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{what} `{name}` is not a valid name (lowercase letters, digits, `_`, `-`; at most 32)"
        ))
    }
}

impl TryFrom<UserFields> for User {
    type Error = String;
    fn try_from(f: UserFields) -> Result<User, String> {
        check_name("user name", &f.name)?;
        for g in &f.groups {
            check_name("group", g)?;
        }
        if f.uid == 0 {
            return Err("uid 0 is root's; pick another uid (e.g. 1000)".into());
        }
        let sudo_nopasswd = match f.sudo.as_deref() {
            None => false,
            Some("nopasswd") => true,
            Some(other) => {
                return Err(format!(
                    "sudo `{other}` is not supported; the one value is `nopasswd`"
                ))
            }
        };
        let home = match f.home {
            Some(h) => h,
            None => ImagePath::parse(&format!("/home/{}", f.name))?,
        };
        Ok(User {
            uid: f.uid,
            gid: f.gid.unwrap_or(f.uid),
            home,
            shell: f.shell.map_or_else(|| ImagePath::parse("/bin/bash"), Ok)?,
            groups: f.groups,
            sudo_nopasswd,
            authorized_keys: f.authorized_keys,
            linger: f.linger,
            keys_from: {
                let mut k = f.keys_from;
                k.sort();
                k.dedup();
                k
            },
            name: f.name,
        })
    }
}

/// Reads public keys, refusing anything that looks like a private key.
pub fn read_public_keys(path: &std::path::Path) -> Result<String, StepError> {
    let text = std::fs::read_to_string(path).map_err(|source| StepError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if text.contains("PRIVATE KEY") {
        return Err(StepError::Other(format!(
            "{} holds a private key; give the public key (the `.pub` file) — private keys never go into an image",
            path.display()
        )));
    }
    let keys: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if keys.is_empty()
        || keys
            .iter()
            .any(|k| !k.starts_with("ssh-") && !k.starts_with("ecdsa-") && !k.starts_with("sk-"))
    {
        return Err(StepError::Other(format!(
            "{} is not an OpenSSH public key file (lines like `ssh-ed25519 AAAA… comment`)",
            path.display()
        )));
    }
    Ok(keys.join("\n") + "\n")
}

/// The first-boot script that installs per-VM keys (`@USER@`, `@SOURCES@` filled in).
const PER_VM_KEYS_SCRIPT: &str = r#"#!/bin/sh
# Installs this VM's SSH keys for @USER@ (written by kiln's `user` step).
# Sources: @SOURCES@
set -u
keys=""
case " @SOURCES@ " in *" cmdline "*)
  for word in $(cat /proc/cmdline); do
    case "$word" in kiln.authorized_key=*)
      key=$(printf '%s' "${word#kiln.authorized_key=}" | base64 -d 2>/dev/null) && keys="$keys$key
" ;;
    esac
  done ;;
esac
case " @SOURCES@ " in *" mmds "*)
  if command -v curl >/dev/null; then
    ip route add 169.254.169.254 dev "$(ip -o link show | awk -F': ' '$2 != "lo" {print $2; exit}')" 2>/dev/null || true
    token=$(curl -sf -m 3 -X PUT http://169.254.169.254/latest/api/token -H 'X-metadata-token-ttl-seconds: 60') &&
      key=$(curl -sf -m 3 -H "X-metadata-token: $token" http://169.254.169.254/latest/meta-data/public-keys/0/openssh-key) &&
      keys="$keys$key
"
  else
    echo "kiln-authorized-keys: curl is missing, MMDS not asked" >&2
  fi ;;
esac
[ -n "$keys" ] || { echo "kiln-authorized-keys: no keys given"; exit 0; }
home=$(getent passwd @USER@ | cut -d: -f6)
install -d -m 0700 -o @USER@ -g "$(id -g @USER@)" "$home/.ssh"
printf '%s' "$keys" | while IFS= read -r line; do
  [ -n "$line" ] || continue
  grep -qxF "$line" "$home/.ssh/authorized_keys" 2>/dev/null || printf '%s
' "$line" >> "$home/.ssh/authorized_keys"
done
chown @USER@: "$home/.ssh/authorized_keys"
chmod 0600 "$home/.ssh/authorized_keys"
echo "kiln-authorized-keys: installed keys for @USER@"
"#;

/// The unit that runs it before sshd (`@NETWORK@` filled in for MMDS).
const PER_VM_KEYS_UNIT: &str = "[Unit]
Description=Install this VM's SSH keys (kernel command line, MMDS)
Before=ssh.service
@NETWORK@
[Service]
Type=oneshot
ExecStart=/usr/local/lib/kiln/authorized-keys
RemainAfterExit=yes

[Install]
WantedBy=multi-user.target
";

impl User {
    /// Shell that installs the per-VM keys script and its enabled unit.
    fn per_vm_keys_script(&self) -> String {
        let q = |s: &str| {
            shlex::try_quote(s)
                .map(|c| c.into_owned())
                .unwrap_or_default()
        };
        let sources: Vec<&str> = self
            .keys_from
            .iter()
            .map(|k| match k {
                KeySource::Cmdline => "cmdline",
                KeySource::Mmds => "mmds",
            })
            .collect();
        let script = PER_VM_KEYS_SCRIPT
            .replace("@USER@", &self.name)
            .replace("@SOURCES@", &sources.join(" "));
        let network = if self.keys_from.contains(&KeySource::Mmds) {
            "Wants=network-online.target\nAfter=network-online.target\n"
        } else {
            ""
        };
        let unit = PER_VM_KEYS_UNIT.replace("@NETWORK@\n", network);
        format!(
            "mkdir -p /usr/local/lib/kiln /etc/systemd/system/multi-user.target.wants\n\
             printf '%s' {} > /usr/local/lib/kiln/authorized-keys\n\
             chmod 0755 /usr/local/lib/kiln/authorized-keys\n\
             printf '%s' {} > /etc/systemd/system/kiln-authorized-keys.service\n\
             ln -sfn /etc/systemd/system/kiln-authorized-keys.service \
             /etc/systemd/system/multi-user.target.wants/kiln-authorized-keys.service\n",
            q(&script),
            q(&unit)
        )
    }

    /// The public keys that go into `authorized_keys` (`--ssh-key` wins over the recipe's).
    pub fn public_keys(&self, ctx: &StepContext) -> Result<Option<String>, StepError> {
        match (ctx.ssh_key, &self.authorized_keys) {
            (Some(key), _) => {
                ctx.note_read("--ssh-key", key);
                read_public_keys(key).map(Some)
            }
            (None, Some(rel)) => read_public_keys(&ctx.recipe_file(rel)?).map(Some),
            (None, None) => Ok(None),
        }
    }
}

impl Kind for User {
    fn encode(&self, enc: &mut KeyEncoder, ctx: &StepContext) -> Result<(), StepError> {
        enc.str(&self.name)
            .u64(self.uid.into())
            .u64(self.gid.into())
            .str(self.home.relative())
            .str(self.shell.relative())
            .strs(&self.groups)
            .bool(self.sudo_nopasswd)
            .opt_str(self.public_keys(ctx)?.as_deref())
            .bool(self.linger)
            .strs(
                &self
                    .keys_from
                    .iter()
                    .map(KeySource::key_name)
                    .collect::<Vec<_>>(),
            );
        Ok(())
    }

    /// The account, its home, sudoers drop-in, authorized keys, lingering
    /// and key service, each as `kiln verify` checks it.
    fn expectations(&self, ctx: &StepContext, _: &Homes) -> Result<Vec<Expect>, StepError> {
        let home = self.home.to_string();
        let mut out = vec![Expect::Account {
            name: self.name.clone(),
            uid: self.uid,
            gid: self.gid,
            home: home.clone(),
            shell: self.shell.to_string(),
        }];
        let owner = Owner {
            user: Principal::Id(self.uid),
            group: Principal::Id(self.gid),
        };
        out.push(Expect::path(home.clone(), &|r| {
            r.kind = Some(FileType::Directory);
            r.owner = Some(owner.clone());
        }));
        if self.sudo_nopasswd {
            out.push(Expect::path(
                format!("/etc/sudoers.d/{}", self.name),
                &|r| {
                    r.kind = Some(FileType::Regular);
                    r.mode = Some(0o440);
                    r.owner = Some(Owner::root());
                    r.contains = Some(format!("{} ALL=(ALL) NOPASSWD:ALL", self.name));
                },
            ));
        }
        if let Some(keys) = self.public_keys(ctx)? {
            out.push(Expect::path(format!("{home}/.ssh"), &|r| {
                r.kind = Some(FileType::Directory);
                r.mode = Some(0o700);
                r.owner = Some(owner.clone());
            }));
            let first = keys.lines().next().unwrap_or_default().to_string();
            out.push(Expect::path(format!("{home}/.ssh/authorized_keys"), &|r| {
                r.kind = Some(FileType::Regular);
                r.mode = Some(0o600);
                r.owner = Some(owner.clone());
                r.contains = Some(first.clone());
            }));
        }
        if self.linger {
            out.push(Expect::path(
                format!("/var/lib/systemd/linger/{}", self.name),
                &|_| {},
            ));
        }
        if !self.keys_from.is_empty() {
            out.push(Expect::path(
                "/etc/systemd/system/multi-user.target.wants/kiln-authorized-keys.service".into(),
                &|r| r.link = Some("/etc/systemd/system/kiln-authorized-keys.service".into()),
            ));
        }
        Ok(out)
    }

    fn action(&self, ctx: &StepContext) -> Result<Action, StepError> {
        let q = |s: &str| {
            shlex::try_quote(s)
                .map(|c| c.into_owned())
                .unwrap_or_default()
        };
        let (name, uid, gid, home) = (&self.name, self.uid, self.gid, self.home.to_string());
        let mut script = format!(
            "set -eu\n\
             if getent passwd {name} >/dev/null; then echo 'user {name} already exists in the image' >&2; exit 1; fi\n\
             if getent passwd {uid} >/dev/null; then echo \"uid {uid} is taken by $(getent passwd {uid} | cut -d: -f1)\" >&2; exit 1; fi\n\
             if ! getent group {name} >/dev/null; then groupadd -g {gid} {name}; fi\n\
             useradd --create-home -u {uid} -g {gid} -d {home} -s {shell}{groups} {name}\n",
            shell = self.shell,
            groups = if self.groups.is_empty() { String::new() } else { format!(" -G {}", self.groups.join(",")) },
        );
        if self.sudo_nopasswd {
            script.push_str(&format!(
                "command -v visudo >/dev/null || {{ echo 'sudo: nopasswd needs the sudo package: install it in a step this one needs' >&2; exit 1; }}\n\
                 mkdir -p /etc/sudoers.d\n\
                 printf '%s\\n' {rule} > /etc/sudoers.d/.{name}.new\n\
                 chmod 0440 /etc/sudoers.d/.{name}.new\n\
                 visudo -cqf /etc/sudoers.d/.{name}.new\n\
                 mv /etc/sudoers.d/.{name}.new /etc/sudoers.d/{name}\n",
                rule = q(&format!("{name} ALL=(ALL) NOPASSWD:ALL")),
            ));
        }
        if let Some(keys) = self.public_keys(ctx)? {
            script.push_str(&format!(
                "install -d -m 0700 -o {uid} -g {gid} {home}/.ssh\n\
                 printf '%s' {keys} > {home}/.ssh/authorized_keys\n\
                 chown {uid}:{gid} {home}/.ssh/authorized_keys\n\
                 chmod 0600 {home}/.ssh/authorized_keys\n",
                keys = q(&keys),
            ));
        }
        if !self.keys_from.is_empty() {
            script.push_str(&self.per_vm_keys_script());
        }
        if self.linger {
            script.push_str(&format!(
                "mkdir -p /var/lib/systemd/linger\ntouch /var/lib/systemd/linger/{name}\n"
            ));
        }
        Ok(Action::Chroot {
            argv: vec!["/bin/sh".into(), "-c".into(), script],
        })
    }

    fn runs_in_root(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_checks() {
        let u: User = serde_yaml::from_str("name: agent\nuid: 1000\nsudo: nopasswd\n").unwrap();
        assert_eq!(
            (u.gid, u.home.to_string(), u.shell.to_string()),
            (1000, "/home/agent".into(), "/bin/bash".into())
        );
        assert!(u.sudo_nopasswd && !u.linger);
        let k: User =
            serde_yaml::from_str("name: a\nuid: 7\nkeys_from: [mmds, cmdline, mmds]\n").unwrap();
        assert_eq!(k.keys_from, [KeySource::Cmdline, KeySource::Mmds]);
        let script = k.per_vm_keys_script();
        assert!(
            script.contains("kiln.authorized_key=")
                && script.contains("After=network-online.target")
        );
        assert!(serde_yaml::from_str::<User>("name: a\nuid: 7\nkeys_from: [ldap]\n").is_err());
        for bad in [
            "name: Agent\nuid: 1000",
            "name: a\nuid: 0",
            "name: a\nuid: 1\nsudo: always",
            "name: a\nuid: 1\nhome: x",
        ] {
            assert!(serde_yaml::from_str::<User>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn private_keys_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let private = tmp.path().join("id");
        std::fs::write(&private, "-----BEGIN OPENSSH PRIVATE KEY-----\nxx\n").unwrap();
        assert!(read_public_keys(&private)
            .unwrap_err()
            .to_string()
            .contains("private key"));
        let public = tmp.path().join("id.pub");
        std::fs::write(&public, "ssh-ed25519 AAAAC3Nza test@kiln\n\n").unwrap();
        assert_eq!(
            read_public_keys(&public).unwrap(),
            "ssh-ed25519 AAAAC3Nza test@kiln\n"
        );
    }
}
