//! The built-in deny rules: id, level, category, reason and pattern.
//!
//! Patterns are matched case-insensitively against normalized lines (see `normalize`), so
//! they are written for plain text: no quotes, no backslashes, single spaces. A few
//! placeholders keep them readable; they are expanded before compiling:
//!
//! | placeholder | stands for |
//! |---|---|
//! | `{ARGS}` | any words of the same command (never across `;`, `&`, `|`) |
//! | `{END}` | the end of a word |
//! | `{LAST}` | the end of the command |
//! | `{SH}` | a shell (`sh`, `bash`, `/bin/zsh`, …) |
//! | `{RUNNER}` | a program that runs code it reads on stdin (a shell, `python -`, …) |
//! | `{HOME}` | a home directory (`~`, `$HOME`, `/root`, `/home/x`) |
//! | `{DEV}` | a block device (`/dev/sda`, `/dev/nvme0n1`, …) |
//! | `{NC}` | netcat and its variants |
//! | `{WRITE}` | writing into the path that follows (`>`, `>>`, `tee`, `cp … `, `sed -i`) |
//! | `{READ}` | a program that reads or copies the file that follows |
//!
//! A rule's `unless` pattern is matched against what the rule matched; when it matches, that
//! occurrence does not count (e.g. netcat to `localhost`).

use super::{Category, Level};

/// One built-in deny rule.
#[derive(Debug, Clone, Copy)]
pub struct BuiltIn {
    pub id: &'static str,
    pub level: Level,
    pub category: Category,
    pub reason: &'static str,
    pub pattern: &'static str,
    pub unless: Option<&'static str>,
    /// Matched against the text as received, before normalization (control characters).
    pub raw: bool,
}

const fn rule(
    id: &'static str,
    level: Level,
    category: Category,
    reason: &'static str,
    pattern: &'static str,
) -> BuiltIn {
    BuiltIn {
        id,
        level,
        category,
        reason,
        pattern,
        unless: None,
        raw: false,
    }
}

impl BuiltIn {
    const fn unless(mut self, pattern: &'static str) -> Self {
        self.unless = Some(pattern);
        self
    }

    const fn raw(mut self) -> Self {
        self.raw = true;
        self
    }
}

/// Expands the placeholders of a built-in pattern.
pub fn expand(pattern: &str) -> String {
    const PLACEHOLDERS: &[(&str, &str)] = &[
        // Composite ones first: they contain others.
        (
            "{RUNNER}",
            r"(?:{SH}|(?:[^\s;&|]*/)?\b(?:python[0-9.]*|perl|ruby|node|php|lua)(?:\s+-)?{LAST})",
        ),
        (
            "{WRITE}",
            r"(?:>>?\s*|\btee\s+(?:-a\s+)?|\b(?:cp|mv|install|ln)\s+(?:[^\s;&|]+\s+)+|\bsed\s+{ARGS}-i\S*\s+{ARGS})",
        ),
        (
            "{READ}",
            r"\b(?:cat|tac|less|more|head|tail|nl|cp|mv|scp|rsync|base64|base32|xxd|od|hexdump|strings|tar|zip|7z|gzip|curl|wget|nc|ncat|openssl|gpg|awk|sed|grep|egrep|vi|vim|nano|emacs|type|get-content|python[0-9.]*|perl|ruby|node|php|sort|dd|install)\s+{ARGS}",
        ),
        ("{ARGS}", r"(?:[^\s;&|]+\s+)*"),
        ("{END}", r"(?:[\s;&|)]|$)"),
        ("{LAST}", r"\s*(?:$|[;&|)])"),
        ("{SH}", r"(?:[^\s;&|]*/)?\b(?:ba|da|z|k|c|tc|fi|a|mk)?sh\b"),
        ("{HOME}", r"(?:~|\$\{?home\}?|/root|/home/[^\s/;&|]+)"),
        (
            "{DEV}",
            r"/dev/(?:sd[a-z]|hd[a-z]|vd[a-z]|xvd[a-z]|nvme[0-9]|mmcblk[0-9]|disk[0-9]|dm-[0-9]|md[0-9]|mapper/|loop[0-9]|root\b)",
        ),
        ("{NC}", r"(?:nc|ncat|netcat|nc\.traditional|nc\.openbsd)"),
    ];
    let mut out = pattern.to_owned();
    for (name, value) in PLACEHOLDERS {
        out = out.replace(name, value);
    }
    out
}

/// Loopback destinations: talking to your own machine is not exfiltration.
const LOOPBACK: &str = r"\b(?:localhost|127\.[0-9.]+|0\.0\.0\.0)\b|\[?::1\]?";

use Category::*;
use Level::*;

/// Every built-in rule. Ids are stable: `waf.disabled_rules` and audit records name them.
#[rustfmt::skip]
pub const RULES: &[BuiltIn] = &[
    // ---- evasion (matched on the text as received)
    rule("evasion.nul_byte", Critical, Evasion,
        "a NUL character: text after it may be cut off by one reader and seen by another",
        r"\x00").raw(),
    rule("evasion.control_char", High, Evasion,
        "a control character (escape sequences can hide or rewrite what a terminal shows)",
        r"[\x01-\x08\x0B\x0C\x0E-\x1F\x7F\x{80}-\x{9F}]").raw(),
    rule("evasion.decode_to_shell", Critical, Evasion,
        "decodes hidden text (base64, hex, reversed) straight into a shell or interpreter",
        r"(?:\bbase(?:64|32)\s+{ARGS}(?:-\w*d\w*|--decode)\b|\bxxd\s+{ARGS}-r|\bopenssl\s+(?:enc|base64)\b[^|\n]*\s-d\b|\buudecode\b|\|\s*rev\s*|\btr\s+[^|\n]*n-za-m)[^|\n]*\|\s*(?:sudo\s+)?(?:env\s+)?{RUNNER}"),
    rule("evasion.eval_decoded", Critical, Evasion,
        "evaluates decoded text (base64, hex) as code",
        r"\b(?:eval|exec|source|iex|invoke-expression)\b[^\n]*(?:\bbase(?:64|32)\s+{ARGS}(?:-\w*d\w*|--decode)\b|b64decode|\batob\b|frombase64string|\bxxd\s+{ARGS}-r)|{SH}\s+-c\s+\$\([^\n]*\bbase64\s+{ARGS}(?:-\w*d\w*|--decode)\b"),
    rule("evasion.powershell_encoded", High, Evasion,
        "PowerShell with an encoded command",
        r"\b(?:powershell|pwsh)(?:\.exe)?\b[^\n]*\s-(?:e|ec|en|enc|encodedcommand)\s+[a-z0-9+/=]{16,}"),

    // ---- destructive file-system operations
    rule("fs.rm_root", Critical, FileDestruction,
        "deletes the root file system",
        r"\brm\s+{ARGS}/+\*?{END}"),
    rule("fs.no_preserve_root", Critical, FileDestruction,
        "disables rm's protection of /",
        r"--no-preserve-root\b"),
    rule("fs.rm_home", Critical, FileDestruction,
        "deletes a home directory",
        r"\brm\s+{ARGS}{HOME}/*\*?{END}"),
    rule("fs.rm_system_dir", Critical, FileDestruction,
        "deletes a system directory",
        r"\brm\s+{ARGS}/(?:bin|boot|dev|etc|home|lib|lib32|lib64|opt|proc|root|sbin|srv|sys|usr|var|usr/(?:bin|lib|local|sbin|share)|var/lib)/*\*?{END}"),
    rule("fs.rm_parent", High, FileDestruction,
        "deletes the parent directory, outside the work dir",
        r"\brm\s+{ARGS}(?:\.\./*)+\*?{END}"),
    rule("fs.find_delete", Critical, FileDestruction,
        "deletes files across the whole file system or a home directory",
        r"\bfind\s+(?:/+|{HOME}/*|/(?:bin|boot|etc|home|lib|opt|root|srv|usr|var)/*)\s[^;&|\n]*(?:-delete\b|-exec\s+\S*\b(?:rm|shred|unlink)\b)"),
    rule("fs.mv_root", Critical, FileDestruction,
        "moves the root file system or a home directory away",
        r"\bmv\s+{ARGS}(?:/+\*?|{HOME}/*\*?)\s"),
    rule("fs.mv_to_dev_null", High, FileDestruction,
        "moves files into /dev/null (deletes them)",
        r"\bmv\s+{ARGS}/dev/null{LAST}"),
    rule("fs.shred_system", Critical, FileDestruction,
        "overwrites system files or a home directory",
        r"\bshred\s+{ARGS}(?:/+\*?|/(?:etc|boot|bin|usr|var|lib)\S*|{HOME}/*\*?){END}"),
    rule("fs.recursive_perms_root", Critical, FileDestruction,
        "recursively changes owner or mode of / or a system directory",
        r"\bch(?:mod|own|grp)\s+{ARGS}(?:-[a-z]*r[a-z]*|--recursive)\s+{ARGS}(?:/+\*?|{HOME}/*|/(?:etc|usr|var|bin|sbin|lib|boot))/*{END}"),
    rule("fs.rm_work_dir", Moderate, FileDestruction,
        "deletes everything in the current directory",
        r"\brm\s+{ARGS}(?:\./?\*?|\*){END}"),
    rule("fs.chmod_world_writable", Moderate, FileDestruction,
        "makes files writable by every user",
        r"\bchmod\s+{ARGS}(?:0?777|[ao]\+rwx|ugo\+rwx){END}"),
    rule("fs.windows_wipe", Critical, FileDestruction,
        "deletes a whole Windows drive",
        r"\b(?:rd|rmdir)\s+(?:/[sq]\s+)+[a-z]:/?{END}|\bdel\s+(?:/[fsqa]\s+)+[a-z]:/?(?:\*(?:\.\*)?)?{END}|\bremove-item\b[^;&|\n]*-recurse\b[^;&|\n]*\s[a-z]:/?{END}|\bvssadmin\s+delete\s+shadows\b|\bwmic\s+shadowcopy\s+delete\b"),

    // ---- disks and partitions
    rule("disk.mkfs", Critical, Disk,
        "creates a file system (erases the device)",
        r"\b(?:mkfs(?:\.\w+)?|mke2fs|mkdosfs|mkntfs)\b|\bmkswap\s+{ARGS}/dev/"),
    rule("disk.dd_to_device", Critical, Disk,
        "writes raw data onto a disk",
        r"\bdd\b[^;&|\n]*\bof=\s*{DEV}"),
    rule("disk.write_to_device", Critical, Disk,
        "writes onto a disk device",
        r"(?:>\s*|\btee\s+(?:-a\s+)?|\bcp\s+[^\s;&|]+\s+){DEV}"),
    rule("disk.partition", Critical, Disk,
        "rewrites or wipes a partition table",
        r"\b(?:sfdisk|cfdisk|gdisk|sgdisk|wipefs|blkdiscard|diskpart)\b|\b(?:fdisk|parted)\s+(?:-[^l\s-]\S*\s+)*{DEV}|\bformat\s+[a-z]:{END}"),
    rule("disk.shred_device", Critical, Disk,
        "overwrites a disk",
        r"\b(?:shred|badblocks\s+{ARGS}-w)\s+{ARGS}{DEV}"),
    rule("disk.encrypt_erase", Critical, Disk,
        "formats or erases an encrypted volume",
        r"\bcryptsetup\s+{ARGS}(?:luksformat|erase|luksErase)\b"),
    rule("disk.volume_remove", High, Disk,
        "removes volumes or pools",
        r"\b(?:lvremove|vgremove|pvremove)\b|\bz(?:pool|fs)\s+destroy\b|\bmdadm\s+{ARGS}--zero-superblock\b"),

    // ---- privilege escalation
    rule("priv.sudo", High, PrivilegeEscalation,
        "runs a command as root",
        r"\bsudo\s+(?:-{1,2}[\w-]+(?:\s|$)|[^\s;&|-])"),
    rule("priv.su", High, PrivilegeEscalation,
        "switches to another user",
        r"\bsu\s+(?:-l?\s+)?root\b|(?:^|[;&|(]\s*)su(?:\s+-l?)?{LAST}|\bsu\s+{ARGS}-c\s"),
    rule("priv.doas_pkexec", High, PrivilegeEscalation,
        "runs a command as another user",
        r"\b(?:doas|pkexec|runuser)\s+\S"),
    rule("priv.setuid", High, PrivilegeEscalation,
        "sets the setuid or setgid bit",
        r"\bchmod\s+{ARGS}(?:[ugoa]*\+[rwxt]*s[rwxt]*|[24-7][0-7]{3}){END}"),
    rule("priv.capabilities", Critical, PrivilegeEscalation,
        "grants a root capability to a program",
        r"\bsetcap\b[^;&|\n]*cap_(?:setuid|setgid|sys_admin|dac_override|dac_read_search|sys_ptrace|sys_module)"),
    rule("priv.auth_files", Critical, PrivilegeEscalation,
        "writes the system's user, password or sudo files",
        r"{WRITE}/etc/(?:passwd|shadow|group|gshadow|sudoers)|\bnopasswd\b|\bvisudo\b"),
    rule("priv.accounts", High, PrivilegeEscalation,
        "creates, changes or deletes accounts and their groups",
        r"\b(?:useradd|adduser|userdel|deluser|chpasswd|gpasswd|groupadd)\s+\S|\busermod\s+{ARGS}-\w*g|(?:^|[;&|(]\s*|\bsudo\s+)passwd\b|\bnet\s+user\s+\S+\s+\S+\s+/add\b"),
    rule("priv.ld_preload", High, PrivilegeEscalation,
        "injects a library into other programs",
        r"\bld_preload="),

    // ---- reverse shells
    rule("revshell.dev_tcp", Critical, ReverseShell,
        "opens a network connection from the shell (/dev/tcp)",
        r"/dev/(?:tcp|udp)/"),
    rule("revshell.netcat_exec", Critical, ReverseShell,
        "netcat serving a program (a shell) over the network",
        r"\b{NC}\b[^;&|\n]*\s(?:(?-i:-[a-zA-Z]*[ec])\b|--(?:exec|sh-exec|lua-exec)\b)"),
    rule("revshell.socat_exec", Critical, ReverseShell,
        "socat serving a program over the network",
        r"\bsocat\b[^;&|\n]*\b(?:exec|system):"),
    rule("revshell.fifo", Critical, ReverseShell,
        "a named pipe wiring a shell to the network",
        r"\bmk(?:fifo|nod)\b[^\n]*\b(?:{NC}|telnet|openssl|socat)\b"),
    rule("revshell.pipe", Critical, ReverseShell,
        "a shell wired to a network connection",
        r"\b(?:{NC}|telnet|socat|openssl\s+s_client)\b[^\n]*\|\s*(?:sudo\s+)?{SH}|{SH}\s+-i\b[^\n]*\|\s*(?:{NC}|telnet|openssl)\b"),
    rule("revshell.script", Critical, ReverseShell,
        "a script connecting a socket to a shell",
        r"(?:(?:socket\.socket|socket\.tcp|net\.socket|use\s+socket\b)[^\n]*\bconnect\s*\(|tcpsocket\.(?:new|open)|fsockopen|io::socket|net\.connect|createconnection)[^\n]*(?:dup2|pty\.spawn|subprocess|popen|proc_open|\bexec\w*|\bsystem\b|\bspawn\b|/bin/\w*sh|cmd\.exe)|child_process[^\n]*(?:net\.socket|net\.connect|createconnection)"),
    rule("revshell.awk_inet", Critical, ReverseShell,
        "awk opening a network connection",
        r"/inet/(?:tcp|udp)/"),
    rule("revshell.powershell", Critical, ReverseShell,
        "a PowerShell TCP client",
        r"net\.sockets\.tcpclient\b"),
    rule("revshell.xterm", Critical, ReverseShell,
        "an X terminal displayed on a remote host",
        r"\bxterm\s+{ARGS}-display\s+\S+:\d"),

    // ---- download and run
    rule("remote.pipe_to_shell", High, RemoteCode,
        "runs code downloaded from the network",
        r"\b(?:curl|wget|fetch|aria2c|lwp-download|iwr|irm|invoke-webrequest|invoke-restmethod)\b[^\n]*\|\s*(?:sudo\s+(?:-\S+\s+)*)?(?:env\s+)?{RUNNER}"),
    rule("remote.substitution", High, RemoteCode,
        "runs code downloaded from the network",
        r"(?:{SH}|\beval|\bsource|\bexec|\bpython[0-9.]*|\bperl|\bruby|\bnode|\bphp|(?:^|[;&|]\s*)\.)\s+(?:-\w+\s+)*(?:<\(|\$\()\s*(?:curl|wget|fetch)\b"),
    rule("remote.powershell", High, RemoteCode,
        "PowerShell running downloaded code",
        r"\b(?:iex|invoke-expression)\b[^\n]*\b(?:iwr|irm|invoke-webrequest|invoke-restmethod|downloadstring|webclient)\b|\b(?:iwr|irm|invoke-webrequest|invoke-restmethod|downloadstring)\b[^\n]*\|\s*(?:iex|invoke-expression)\b"),
    rule("remote.download_exec", High, RemoteCode,
        "downloads a program into a temp dir and runs it",
        r"\b(?:curl|wget)\b[^\n]*\s(?:-o\s*|-O\s*|--output[= ])?(?:/tmp|/dev/shm|/var/tmp)/[^\s;&|]+[^\n]*(?:&&|;)\s*(?:chmod\s+(?:\+x|[0-7]*[1357][0-7]*)\b|{SH}\s+(?:/tmp|/dev/shm|/var/tmp)/|(?:/tmp|/dev/shm|/var/tmp)/)"),

    // ---- fork bombs
    rule("forkbomb.function", Critical, ForkBomb,
        "a fork bomb",
        r"[\w:.]+\s*\(\s*\)\s*\{\s*[\w:.]+\s*\|\s*[\w:.]+\s*&\s*;?\s*\}"),
    rule("forkbomb.loop", Critical, ForkBomb,
        "a fork bomb",
        r"\bfork\s+while\s+fork\b|\bwhile\s*\(?\s*(?:true|1)\s*\)?\s*:?\s*os\.fork\(|\bloop\s*\{\s*fork\b|\bwhile\s*\(\s*1\s*\)\s*\{?\s*fork\(|\$0\s*[|&]\s*\$0|%0\s*\|\s*%0"),

    // ---- credentials and keys
    rule("cred.shadow", Critical, Credentials,
        "reads the system's password hashes",
        r"/etc/(?:g?shadow|master\.passwd)\b|\bunshadow\b"),
    rule("cred.ssh_private_key", Critical, Credentials,
        "reads an SSH private key",
        r"(?:{READ}|<\s*)[^\s;&|]*\.ssh/(?:id_(?:rsa|dsa|ecdsa|ed25519)(?:_sk)?|identity)(?:[^\w.]|$)|/etc/ssh/ssh_host_\w+_key(?:[^\w.]|$)"),
    rule("cred.ssh_dir", High, Credentials,
        "copies or archives an SSH directory",
        r"\b(?:tar|zip|7z|scp|rsync|cp|base64)\b[^;&|\n]*\s(?:{HOME}/)?\.ssh/?\*?{END}"),
    rule("cred.cloud_files", High, Credentials,
        "reads cloud, cluster or registry credentials",
        r"(?:{READ}|<\s*)[^\s;&|]*(?:\.aws/credentials|\.aws/?{END}|\.config/gcloud/(?:credentials\.db|access_tokens\.db|legacy_credentials|application_default_credentials\.json)|\.azure/(?:accesstokens\.json|msal_token_cache)|\.kube/config|\.docker/config\.json|\.netrc|\.pgpass|\.git-credentials|\.vault-token|\.pypirc|\.config/gh/hosts\.yml|\.terraform\.d/credentials|\.gnupg/)"),
    rule("cred.proc_environ", Critical, Credentials,
        "reads another process's environment or memory",
        r"/proc/(?:\d+|self|\*|\$\$|\$\{?\w+\}?)/(?:environ|mem)\b"),
    rule("cred.secret_variable", High, Credentials,
        "prints a secret from the environment",
        r"\b(?:echo|printf|print)\b[^;&|\n]*\$\{?(?-i:[A-Z0-9_]*(?:SECRET|PASSWORD|PASSWD|TOKEN|API_KEY|APIKEY|PRIVATE_KEY|ACCESS_KEY|CREDENTIALS?)[A-Z0-9_]*)\}?"),
    rule("cred.keystores", High, Credentials,
        "exports keys or passwords from a key store",
        r"\bgpg\s+{ARGS}--export-secret(?:-sub)?-keys\b|\bsecurity\s+(?:find-generic-password|find-internet-password|dump-keychain)\b|\bsecret-tool\s+lookup\b|\bkubectl\s+config\s+view\b[^;&|\n]*--raw\b|\bkubectl\s+get\s+secrets?\b[^;&|\n]*\s-o\s*(?:yaml|json|jsonpath)"),
    rule("cred.browser_store", High, Credentials,
        "reads a browser's saved passwords or cookies",
        r"(?:google-chrome|chromium|bravesoftware|mozilla/firefox|\.mozilla/firefox)/[^\n]*(?:login data|cookies|key[34]\.db|logins\.json)"),
    rule("cred.dumpers", High, Credentials,
        "a credential dumping tool",
        r"\b(?:mimikatz|sekurlsa|lsadump|lazagne)\b|\blsass\b[^\n]*\.dmp\b|\bprocdump\b[^\n]*\blsass\b"),
    rule("cred.history", High, Credentials,
        "reads shell or client history (often holds secrets)",
        r"{READ}[^\s;&|]*\.(?:bash|zsh|sh|mysql|psql|python)_history\b"),
    rule("cred.env_dump", Moderate, Credentials,
        "prints the whole environment",
        r"(?:^|[;&|(]\s*)(?:printenv|env|export\s+-p|declare\s+-x){LAST}"),

    // ---- exfiltration
    rule("exfil.upload_sensitive", High, Exfiltration,
        "uploads a sensitive file",
        r"(?:\bcurl\b[^;&|\n]*\s(?:(?:-d|--data(?:-binary|-raw|-urlencode)?)[=\s]+@|(?-i:-F)[=\s]*\S*=@|--form[=\s]+\S*=@|(?-i:-T)\s*|--upload-file[=\s]+)|\bwget\b[^;&|\n]*--(?:post|body)-file[=\s]+)(?:/etc/|{HOME}/\.|/proc/|/var/log/|/root/|[^\s;&|]*(?:\.ssh/|\.aws/|\.gnupg/|\.kube/|\.env\b|id_rsa|id_ed25519|credentials|\.pem\b|\.key\b|shadow\b|passwd\b))"),
    rule("exfil.pipe_sensitive", High, Exfiltration,
        "sends secrets or an archive over the network",
        r"(?:(?:^|[;&|(]\s*)(?:env|printenv|history|set)\b|/etc/(?:passwd|shadow|hosts)|\.ssh/|\.aws/|\.env\b|\.kube/|/proc/\S*/environ|_history\b|\bid_rsa\b|\btar\b|\bzip\b)[^\n]*\|\s*(?:[^\s;&|]*/)?(?:curl|wget|{NC}|socat|telnet|openssl\s+s_client)\b"),
    rule("exfil.netcat_send", High, Exfiltration,
        "sends data to another host with netcat",
        r"\|\s*(?:[^\s;&|]*/)?(?:{NC}|socat|telnet)\b[^;&|\n]*|\b{NC}\s+[^;&|\n]*<\s*[^\s;&|]+").unless(LOOPBACK),
    rule("exfil.substitution", High, Exfiltration,
        "puts host data into a request or a DNS name",
        r"\b(?:curl|wget|dig|nslookup|host|ping)\b[^\n]*\$\(\s*(?:env|printenv|whoami|id|hostname|uname|history|cat\s+(?:/etc/|~|\$home|\S*\.(?:ssh|aws|env)\b))"),
    rule("exfil.drop_sites", High, Exfiltration,
        "sends data to a paste, file-drop or request-capture site",
        r"\b(?:curl|wget|{NC}|http|iwr|invoke-webrequest|invoke-restmethod)\b[^\n]*\b(?:transfer\.sh|termbin\.com|0x0\.st|file\.io|pastebin\.com|paste\.ee|ix\.io|sprunge\.us|webhook\.site|requestbin\.\w+|pipedream\.net|interact\.sh|oast\.(?:fun|me|site|live|pro|online)|burpcollaborator\.net|ngrok\.io|ngrok-free\.app)\b"),
    rule("exfil.tunnel", High, Exfiltration,
        "opens a tunnel from this machine to the internet",
        r"\bngrok\s+(?:tcp|http|tls)\b|\bchisel\s+(?:client|server)\b|\bssh\s+{ARGS}-r\s*\S*\d|\bcloudflared\s+tunnel\b|\bbore\s+local\b"),
    rule("exfil.copy_sensitive", High, Exfiltration,
        "copies secrets to another host",
        r"\b(?:scp|rsync|sftp)\b[^;&|\n]*(?:/etc/(?:passwd|shadow)|\.ssh\b|\.aws\b|\.gnupg\b|\.kube\b|\.env\b|/root\b)[^;&|\n]*\s[\w.-]+@?[\w.-]+:|\b(?:mail|mailx|sendmail|mutt)\b[^;&|\n]*<\s*(?:/etc/|~|\$home|\S*\.(?:ssh|aws|env)\b)"),

    // ---- container escape
    rule("container.privileged", Critical, ContainerEscape,
        "a privileged container (full access to the host)",
        r"\b(?:docker|podman|nerdctl)\s+(?:container\s+)?(?:run|create|exec)\b[^;&|\n]*--privileged\b|\bkubectl\s+(?:run|debug)\b[^;&|\n]*(?:--privileged|--profile[= ]sysadmin|\snode/)"),
    rule("container.host_mount", Critical, ContainerEscape,
        "mounts the host's root, system directories or Docker socket into a container",
        r"\b(?:docker|podman|nerdctl)\s+[^;&|\n]*(?:\s-v|--volume|--mount)[=\s]+(?:type=bind,\s*)?(?:source=|src=)?(?:/|/etc|/root|/var/run/docker\.sock|/run/docker\.sock|/proc|/sys|/dev|/boot|/var/lib/docker)(?::|,)"),
    rule("container.host_pid", Critical, ContainerEscape,
        "a container in the host's process namespace",
        r"\b(?:docker|podman|nerdctl)\s+[^;&|\n]*--pid[=\s]+host\b"),
    rule("container.host_namespaces", High, ContainerEscape,
        "a container sharing host namespaces",
        r"\b(?:docker|podman|nerdctl)\s+[^;&|\n]*--(?:userns|uts|cgroupns)[=\s]+host\b"),
    rule("container.capabilities", Critical, ContainerEscape,
        "a container with host-level capabilities or devices",
        r"--cap-add[=\s]+(?:all|sys_admin|sys_ptrace|sys_module|dac_read_search|dac_override|sys_rawio|bpf)\b|--device[=\s]+/dev/(?:sd|nvme|mem|kmem|hd|vd|xvd)"),
    rule("container.unconfined", High, ContainerEscape,
        "a container without its security profile",
        r"--security-opt[=\s]+(?:apparmor|seccomp|label)[=:]\s*(?:unconfined|disable)"),
    rule("container.nsenter", Critical, ContainerEscape,
        "enters the host's namespaces",
        r"\bnsenter\b[^;&|\n]*(?:-t\s*1\b|--target[=\s]+1\b|\s-a\b|--all\b)|/proc/1/(?:ns|root)/"),
    rule("container.docker_socket", High, ContainerEscape,
        "talks to the Docker daemon's socket (root on the host)",
        r"\b(?:curl|socat|{NC})\b[^;&|\n]*(?:/var)?/run/docker\.sock|docker_host=\S*docker\.sock|\s-h\s+unix://"),
    rule("container.cgroup_escape", Critical, ContainerEscape,
        "the cgroup release-agent escape",
        r"\b(?:release_agent|notify_on_release)\b"),
    rule("container.chroot_host", Critical, ContainerEscape,
        "changes root into the host's file system",
        r"\bchroot\s+/(?:host|hostfs|rootfs|mnt|proc/1/root)\b"),
    rule("container.mount_device", Critical, ContainerEscape,
        "mounts or edits a disk device",
        r"\bmount\s+[^;&|\n]*{DEV}|\bdebugfs\s+{ARGS}{DEV}"),

    // ---- persistence
    rule("persist.crontab", High, Persistence,
        "installs or removes scheduled jobs",
        r"\bcrontab\s+(?:-u\s+\S+\s+)?(?:-[eir]\b|-{LAST}|[^\s;&|-]\S*)|{WRITE}(?:/etc/cron|/var/spool/cron|/etc/anacrontab)"),
    rule("persist.systemd", High, Persistence,
        "installs a service that starts by itself",
        r"\bsystemctl\s+{ARGS}enable\b|{WRITE}[^\s;&|]*(?:/etc/systemd/|/lib/systemd/system/|\.config/systemd/user/|/etc/init\.d/|/etc/rc\.local)"),
    rule("persist.shell_startup", High, Persistence,
        "changes a shell's startup files",
        r"{WRITE}(?:[^\s;&|]*\.(?:bashrc|bash_profile|bash_login|profile|zshrc|zprofile|zshenv|zlogin|cshrc|tcshrc|kshrc|config/fish/config\.fish)\b|/etc/(?:profile|bash\.bashrc|environment)\b|/etc/profile\.d/)"),
    rule("persist.authorized_keys", Critical, Persistence,
        "adds an SSH key that may log in",
        r"{WRITE}[^\s;&|]*authorized_keys2?\b"),
    rule("persist.preload", Critical, Persistence,
        "injects a library into every program (ld.so.preload)",
        r"/etc/ld\.so\.preload\b"),
    rule("persist.other", High, Persistence,
        "installs something that starts by itself",
        r"\blaunchctl\s+(?:load|bootstrap|submit)\b|library/launch(?:agents|daemons)/|\bschtasks\s+/create\b|currentversion/?run\b|\|\s*at\s+(?:now|midnight|noon)\b|\bat\s+now\s*\+"),

    // ---- kernel
    rule("kernel.module", Critical, Kernel,
        "loads or unloads a kernel module",
        r"\b(?:insmod|rmmod)\s+\S|\bmodprobe\s+(?:-\S+\s+)*\w"),
    rule("kernel.sysrq", Critical, Kernel,
        "triggers a kernel SysRq action (crash, reboot)",
        r"/proc/sysrq-trigger"),
    rule("kernel.hooks", Critical, Kernel,
        "changes a program the kernel runs as root",
        r"/proc/sys/kernel/(?:core_pattern|modprobe)|/sys/kernel/uevent_helper"),
    rule("kernel.devices", Critical, Kernel,
        "reads or writes kernel memory",
        r"/dev/(?:mem|kmem|port)\b|\bkexec\b"),
    rule("kernel.tunables", High, Kernel,
        "changes kernel parameters",
        r"(?:>\s*|\btee\s+(?:-a\s+)?)/proc/sys/|\bsysctl\s+(?:-\S+\s+)*-w\b|\bsysctl\s+(?:-\S+\s+)*[\w.]+="),

    // ---- system
    rule("sys.shutdown", High, System,
        "shuts down or reboots the machine",
        r"(?:^|[;&|({]\s*|\b(?:sudo|doas|exec|then|do)\s+)(?:shutdown|reboot|halt|poweroff)(?:\s+-[a-z-]+)*{LAST}|\bshutdown\s+(?:-[hrpc]\b|now\b|\+\d)|\bsystemctl\s+(?:poweroff|reboot|halt|kexec|rescue|emergency)\b|\b(?:tel)?init\s+[06]{LAST}"),
    rule("sys.kill_all", High, System,
        "kills every process (or init)",
        r"\bkill\s+(?:-\S+\s+)*-1{LAST}|\bkill\s+(?:-\S+\s+)*1{LAST}|\bkillall5\b|\bpkill\s+{ARGS}-u\s+root\b"),
    rule("sys.security_off", High, System,
        "turns off the firewall or a security system",
        r"\biptables\s+(?:-\S+\s+)*(?:(?-i:-F)|--flush|(?-i:-X))\b|\biptables\s+{ARGS}-p\s+\w+\s+accept\b|\bufw\s+disable\b|\bnft\s+flush\s+ruleset\b|\bsetenforce\s+0\b|\bsystemctl\s+(?:stop|disable|mask)\s+(?:firewalld|ufw|apparmor|auditd|selinux|fail2ban|iptables|nftables)\b|\bset-mppreference\b[^\n]*-disable|\bnetsh\s+(?:adv)?firewall\s+set\s+\S+\s+state\s+off\b"),
    rule("sys.cover_tracks", High, System,
        "erases shell history or system logs",
        r"\bhistory\s+-[cw]\b|\bunset\s+histfile\b|\bhistfile=/dev/null|\bexport\s+histsize=0\b|\bset\s+\+o\s+history\b|(?:\brm\b|\bshred\b|>)[^;&|\n]*\.bash_history\b|(?:>\s*|\btruncate\s+(?:-\S+\s+)*-s\s*0\s+|\brm\s+{ARGS}|\bshred\s+{ARGS})/var/log\b|\bjournalctl\s+{ARGS}--vacuum|\bwevtutil\s+cl\b|\bclear-eventlog\b"),
    rule("sys.write_etc", High, System,
        "changes system configuration in /etc",
        r"(?:>>?\s*|\btee\s+(?:-a\s+)?|\bsed\s+{ARGS}-i\S*\s+{ARGS})/etc/|\b(?:cp|mv|install|ln|rsync)\s+(?:[^\s;&|]+\s+)+/etc/[^\s;&|]*{LAST}"),
    rule("sys.immutable", High, System,
        "makes files immutable or append-only",
        r"\bchattr\s+[+-][ai]\b"),
    rule("sys.cryptominer", High, System,
        "a cryptocurrency miner",
        r"\b(?:xmrig|minerd|cpuminer|cgminer|ethminer|nbminer)\b|stratum\+tcp://"),

    // ---- databases
    rule("db.drop_database", High, Database,
        "deletes a whole database",
        r"\bdrop\s+(?:database|schema)\s+(?:if\s+exists\s+)?[\w.]+\s*(?:;|$|cascade\b)|\bdropdb\s+\S|\bdb\.dropdatabase\s*\(|\bflushall\b"),
    rule("db.destroy_data", Moderate, Database,
        "deletes a table or all of its rows",
        r"\bdrop\s+table\b|\btruncate\s+(?:table\s+)?\w|\bflushdb\b|\bdelete\s+from\s+[\w.]+\s*(?:;|$)"),

    // ---- version control
    rule("vcs.rm_git_dir", High, Vcs,
        "deletes a repository's history",
        r"\brm\s+{ARGS}(?:\./)?\.git/*{END}"),
    rule("vcs.discard", Moderate, Vcs,
        "discards uncommitted work",
        r"\bgit\s+(?:-\S+\s+)*reset\s+{ARGS}--hard\b|\bgit\s+clean\s+(?:-\S+\s+)*-[a-z]*f"),
    rule("vcs.force_push", Moderate, Vcs,
        "overwrites a remote branch",
        r"\bgit\s+push\b[^;&|\n]*\s(?:-f|--force){END}|\bgit\s+push\b[^;&|\n]*\s\+\w"),
    rule("vcs.rewrite_history", Moderate, Vcs,
        "deletes branches or rewrites history",
        r"\bgit\s+branch\s+{ARGS}(?-i:-D)\b|\bgit\s+(?:filter-branch|filter-repo)\b|\bgit\s+reflog\s+expire\b|\bgit\s+push\s+[^;&|\n]*--delete\b"),

    // ---- infrastructure
    rule("infra.destroy", Moderate, System,
        "deletes infrastructure, clusters' namespaces or all containers",
        r"\bterraform\s+destroy\b|\bterraform\s+apply\b[^;&|\n]*-auto-approve\b|\bpulumi\s+destroy\b|\bkubectl\s+delete\s+(?:ns|namespaces?|all|pvc?|nodes?|crd)\b|\bkubectl\s+delete\b[^;&|\n]*--all\b|\bdocker\s+(?:system|volume)\s+prune\b"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for r in RULES {
            assert!(seen.insert(r.id), "duplicate rule id {}", r.id);
            assert!(super::super::valid_id(r.id), "bad rule id {}", r.id);
            assert!(!expand(r.pattern).contains("{ARGS}"), "{}", r.id);
        }
    }
}
