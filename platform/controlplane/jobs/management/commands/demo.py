from django.core.management.base import BaseCommand, CommandError

from controlplane.demo import DemoOptions, run_demo


class Command(BaseCommand):
    help = "Run the platform end to end (web, worker, one job) and stop it again."

    def add_arguments(self, parser):
        parser.add_argument("--serve", action="store_true", help="keep running for a browser")
        parser.add_argument("--port", type=int, default=None, help="web port (default: free)")

    def handle(self, *args, serve: bool, port: int | None, **options):
        code = run_demo(DemoOptions(serve=serve, port=port))
        if code:
            raise CommandError(f"demo failed (exit {code})", returncode=code)
