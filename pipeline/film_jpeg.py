"""Pillow's JPEG reader without the one step of opening a film that changes no pixel: its dots per inch.

When a JPEG's JFIF header names no DPI, Pillow reads the whole EXIF block at open (a TIFF structure, parsed in
Python) to fill `info["dpi"]`. Scanners and archive exports write EXIF into most films: 16 of 16 films from one
outside archive, half the Kermany films. There the parse takes about 100 µs of a 165 µs open, near 3% of decoding a
film at 64 px. Nothing in this project reads a JPEG's DPI (a film's spacing, where it matters, is a DICOM header's),
and the EXIF orientation tag is not applied either way. The EXIF bytes stay in `info["exif"]`, unparsed.

Imported by pipeline.imaging's decoder inside the function that opens a JPEG (Pillow loads with it), and by the
ingest benchmark's bare loop, which times the same open beside Image.open's.
"""

from __future__ import annotations

from PIL import JpegImagePlugin


class FilmJpeg(JpegImagePlugin.JpegImageFile):
    """A JPEG opened as Pillow opens it, less the EXIF parse for DPI. Construct it with a path or a binary file;
    a file that is no JPEG raises SyntaxError (Image.open reports it as unidentified)."""

    def _read_dpi_from_exif(self) -> None:
        """Skipped. Should a Pillow release rename this step, its parse runs again: slower, the same pixels."""
