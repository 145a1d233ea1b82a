"""Rotate the platform master key: re-wrap every tenant key, touch no blob.

    manage.py rotate_master_key            # install a new key (file keyrings) and re-wrap
    manage.py rotate_master_key --retire   # afterwards: drop previous keys nothing needs

Safe to interrupt and run again: see the vault package docstring.
"""

from django.core.management.base import BaseCommand, CommandError

from controlplane.vault import conf
from controlplane.vault.exceptions import MasterKeyError
from controlplane.vault.keyring import ENVIRONMENT, GENERATE_HINT
from controlplane.vault.services import master_key_retire_previous, master_key_rotate


class Command(BaseCommand):
    help = "Re-wrap every tenant key under a new platform master key (no blob is touched)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--retire",
            action="store_true",
            help="instead of rotating, remove previous master keys no tenant key still needs",
        )
        parser.add_argument(
            "--no-new-key",
            action="store_true",
            help="only re-wrap tenant keys still under a previous key; never generate a key",
        )

    def handle(self, *args, retire: bool, no_new_key: bool, **options):
        try:
            if retire:
                self._retire()
            else:
                self._rotate(install_new_key=not no_new_key)
        except MasterKeyError as exc:  # a configuration problem: say it, no traceback
            raise CommandError(str(exc)) from exc

    def _say(self, line: str = "") -> None:
        self.stdout.write(line)

    def _rotate(self, *, install_new_key: bool) -> None:
        report = master_key_rotate(install_new_key=install_new_key)
        self._say(f"Master keyring: {report.source} ({report.location})")
        if report.installed_new_key:
            self._say(
                f"Installed a new master key {report.current_key_id} as current; "
                f"kept {', '.join(report.previous_key_ids)} readable."
            )
        elif report.resumed:
            self._say(
                f"Tenant keys were waiting under a previous master key (an interrupted "
                f"rotation, or a newly installed key): finished them under "
                f"{report.current_key_id}; no new key was generated."
            )
        self._say(
            f"Re-wrapped {report.rewrapped} tenant key(s) under {report.current_key_id}; "
            f"no blob was read or written."
        )
        if report.failed:
            raise CommandError(
                f"{len(report.failed)} tenant key(s) failed to authenticate and were left as "
                f"they were: {', '.join(report.failed)}. Their blobs cannot be read."
            )
        if report.pending:
            self._say(
                f"{report.pending} tenant key(s) are still under a previous key (created "
                f"during the run?): run the command again."
            )
        if report.source == ENVIRONMENT and not report.resumed:
            self._environment_instructions(report.current_key_id)
            return
        if report.previous_key_ids and not report.pending:
            where = (
                conf.MASTER_KEY_PREVIOUS_ENV if report.source == ENVIRONMENT else "the keyring file"
            )
            self._say(
                f"Every tenant key is under {report.current_key_id}. The previous key(s) "
                f"{', '.join(report.previous_key_ids)} stay in {where} until you run "
                f"`manage.py rotate_master_key --retire` (after every process has restarted "
                f"or run for a minute, and after backups that need the old key expire)."
            )

    def _environment_instructions(self, current_key_id: str) -> None:
        self._say(
            f"The master key comes from {conf.MASTER_KEY_ENV} (current {current_key_id}); "
            f"Enclave cannot install a new key there. To rotate:\n"
            f"  1. Generate a key: {GENERATE_HINT}\n"
            f"  2. In every Enclave process's environment (web, workers, beat) set\n"
            f"       {conf.MASTER_KEY_ENV}=<the new key>\n"
            f"       {conf.MASTER_KEY_PREVIOUS_ENV}=<the current key>  (comma-separate older "
            f"ones)\n"
            f"     and restart them. Both keys now unwrap; new tenant keys use the new one.\n"
            f"  3. Run `manage.py rotate_master_key` again: it re-wraps every tenant key under "
            f"the new key (safe to interrupt and re-run).\n"
            f"  4. Run `manage.py rotate_master_key --retire`, remove the keys it names from "
            f"{conf.MASTER_KEY_PREVIOUS_ENV}, and restart."
        )

    def _retire(self) -> None:
        report = master_key_retire_previous()
        self._say(f"Master keyring: {report.source} ({report.location})")
        if report.still_needed:
            self._say(
                f"Still needed (tenant keys are wrapped under them; run rotate_master_key "
                f"first): {', '.join(report.still_needed)}"
            )
        if not report.retired:
            self._say(f"No previous master key to retire; current is {report.current_key_id}.")
        elif report.source == ENVIRONMENT:
            self._say(
                f"No tenant key needs {', '.join(report.retired)}: remove them from "
                f"{conf.MASTER_KEY_PREVIOUS_ENV} and restart every process."
            )
        else:
            self._say(
                f"Retired {', '.join(report.retired)} from {report.location}; "
                f"current is {report.current_key_id}."
            )
