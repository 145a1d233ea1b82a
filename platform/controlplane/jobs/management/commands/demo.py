from django.core.management.base import BaseCommand, CommandError

from controlplane.demo import DemoOptions, run_demo


class Command(BaseCommand):
    help = "Run the platform end to end (web, worker, one job) and stop it again."

    def add_arguments(self, parser):
        parser.add_argument("--serve", action="store_true", help="keep running for a browser")
        parser.add_argument("--port", type=int, default=None, help="web port (default: free)")
        parser.add_argument("--no-scenario", action="store_true", help="only the smoke job")
        parser.add_argument("--fast", action="store_true", help="tiny sizes (for tests)")
        parser.add_argument("--model", default=None, help="base model (default: enclave-tiny)")

    def handle(self, *args, serve, port, no_scenario, fast, model, **options):
        code = run_demo(
            DemoOptions(serve=serve, port=port, scenario=not no_scenario, fast=fast, model=model)
        )
        if code:
            raise CommandError(f"demo failed (exit {code})", returncode=code)
