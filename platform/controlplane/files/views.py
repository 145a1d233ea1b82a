"""/v1/files in OpenAI's shapes. Thin: parse, call one service or selector, render."""

from django.conf import settings
from django.http import StreamingHttpResponse
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response
from rest_framework.views import APIView

from controlplane.api_errors import error_body

from . import selectors, services
from .models import File


class FileOutput(serializers.ModelSerializer):
    object = serializers.SerializerMethodField()
    created_at = serializers.SerializerMethodField()
    expires_at = serializers.SerializerMethodField()

    class Meta:
        model = File
        fields = [
            "id", "object", "bytes", "created_at", "expires_at", "filename", "purpose",
            "status", "status_details",
        ]  # fmt: skip

    def get_object(self, _file) -> str:
        return "file"

    def get_created_at(self, file) -> int:
        return int(file.created_at.timestamp())

    def get_expires_at(self, _file) -> int | None:
        return None


class FileUploadInput(serializers.Serializer):
    file = serializers.FileField()
    purpose = serializers.ChoiceField(
        choices=File.UPLOADABLE,
        error_messages={
            "invalid_choice": f'"{{input}}" is not a valid purpose: use one of '
            f"{', '.join(File.UPLOADABLE)}"
        },
    )


class FileListView(APIView):
    parser_classes = [MultiPartParser]

    @extend_schema(
        operation_id="v1_files_list",
        responses=inline_serializer(
            "FileList",
            {"object": serializers.CharField(), "data": FileOutput(many=True)},
        ),
    )
    def get(self, request):
        purpose = request.query_params.get("purpose") or None
        files = selectors.files_list(tenant=request.user.tenant, purpose=purpose)
        return Response({"object": "list", "data": FileOutput(files, many=True).data})

    @extend_schema(request={"multipart/form-data": FileUploadInput}, responses=FileOutput)
    def post(self, request):
        # The only upload handler keeps files in memory (plaintext never touches the disk)
        # and skips one over FILE_UPLOAD_MAX_MEMORY_SIZE, which would then look missing
        # ("No file was submitted"): a body that large holds a file over the limit.
        length = int(request.META.get("CONTENT_LENGTH") or 0)
        if length > settings.FILE_UPLOAD_MAX_MEMORY_SIZE:
            message = (
                f"the upload is {length} bytes; the limit is {settings.ENCLAVE_FILE_MAX_BYTES} "
                "bytes per file"
            )
            return Response(
                error_body(message, "invalid_request_error", param="file", code="file_too_large"),
                status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            )
        payload = FileUploadInput(data=request.data)
        payload.is_valid(raise_exception=True)
        upload = payload.validated_data["file"]
        try:
            file = services.file_create(
                tenant=request.user.tenant,
                filename=upload.name,
                purpose=payload.validated_data["purpose"],
                chunks=upload.chunks(),
                size=upload.size,
            )
        except services.FileTooLarge as exc:
            return Response(
                error_body(str(exc), "invalid_request_error", param="file", code="file_too_large"),
                status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            )
        request._request.audit_object = ("file", file.id)
        return Response(FileOutput(file).data)


class FileDetailView(APIView):
    @extend_schema(responses=FileOutput)
    def get(self, request, file_id: str):
        return Response(
            FileOutput(selectors.file_get(tenant=request.user.tenant, file_id=file_id)).data
        )

    @extend_schema(
        responses={200: inline_serializer(
            "FileDeleted",
            {"id": serializers.CharField(), "object": serializers.CharField(),
             "deleted": serializers.BooleanField()},
        )}  # a DELETE answers 200 with a body, as OpenAI's does (spectacular assumes 204)
    )  # fmt: skip
    def delete(self, request, file_id: str):
        try:
            services.file_delete(tenant=request.user.tenant, file_id=file_id)
        except services.FileInUse as exc:
            return Response(
                error_body(str(exc), "invalid_request_error", param="file_id", code="file_in_use"),
                status=status.HTTP_409_CONFLICT,
            )
        request._request.audit_object = ("file", file_id)
        return Response({"id": file_id, "object": "file", "deleted": True})


class AnyAccept(BaseContentNegotiation):
    """Raw content answers whatever the client accepts (the openai client sends
    `application/binary`); errors still render as JSON."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class FileContentView(APIView):
    content_negotiation_class = AnyAccept

    @extend_schema(responses={(200, "application/octet-stream"): bytes})
    def get(self, request, file_id: str):
        chunks = selectors.file_content(tenant=request.user.tenant, file_id=file_id)
        return StreamingHttpResponse(chunks, content_type="application/octet-stream")
