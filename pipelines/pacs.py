"""`lidc-cdam pacs find`: the studies on a DICOMweb server and their series (QIDO-RS).

  lidc-cdam pacs find --dicomweb URL [--patient ID] [--accession N] [--study-date RANGE] [--modality CT]

prints each study (date, patient, accession, description, StudyInstanceUID) and its series (modality, slices,
date, description, SeriesInstanceUID); `explain-ct --dicomweb URL --study UID` fetches one and explains points.

Credentials come from the environment, never from the command line: LIDC_CDAM_PACS_TOKEN (a bearer token), or
LIDC_CDAM_PACS_USER and LIDC_CDAM_PACS_PASSWORD (HTTP basic auth), or the netrc file's entry for the host ($NETRC
or ~/.netrc). They are never printed, logged or written. TLS certificates are verified unless --insecure.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lidc_cdam.ct.pacs import connect, find_studies, format_table
from lidc_cdam.ct.pacs.client import DEFAULT_TIMEOUT


def add_connection_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """--dicomweb URL, --insecure, --pacs-timeout (shared with `explain-ct`)."""
    parser.add_argument("--dicomweb", metavar="URL", required=required,
                        help="the DICOMweb root of a PACS, e.g. https://pacs.example.org/dicom-web (credentials: "
                             "LIDC_CDAM_PACS_USER / LIDC_CDAM_PACS_PASSWORD, LIDC_CDAM_PACS_TOKEN or netrc)")
    parser.add_argument("--insecure", action="store_true",
                        help="do not verify the server's TLS certificate (only for a server you trust)")
    parser.add_argument("--pacs-timeout", dest="pacs_timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help="seconds to wait for the PACS before giving up (default %(default)g)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    find = sub.add_parser("find", help="studies and their series (QIDO-RS)", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_connection_arguments(find, required=True)
    find.add_argument("--patient", metavar="ID", help="PatientID (wildcards * and ? allowed)")
    find.add_argument("--accession", metavar="N", help="AccessionNumber")
    find.add_argument("--study-date", dest="study_date", metavar="RANGE",
                      help="YYYYMMDD or YYYYMMDD-YYYYMMDD (either end may be open)")
    find.add_argument("--modality", metavar="MOD", help="a modality in the study, e.g. CT")
    find.add_argument("--study", metavar="UID", help="one StudyInstanceUID")
    find.add_argument("--limit", type=int, default=200, help="at most this many studies (default %(default)s)")
    find.add_argument("--json", action="store_true", help="print JSON instead of the table")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    server = connect(args.dicomweb, insecure=args.insecure, timeout=args.pacs_timeout)
    studies = list(find_studies(server, patient=args.patient, accession=args.accession, study_date=args.study_date,
                                modality=args.modality, study=args.study, limit=args.limit))
    found = [s.as_dict() for s in studies]
    print(json.dumps(found, indent=1) if args.json else format_table(studies))
    return found
