"""
The dwtrust dropin: C{twistd dwtrust} and the C{dwtrust:} endpoint strings.
"""

from twisted.application.service import ServiceMaker

from dwtrust._endpoints import ClientParser, ServerParser

dwtrust = ServiceMaker(
    "dwtrust",
    "dwtrust.tap",
    "Zero-trust authenticating proxy: dwtrust in front of a local service.",
    "dwtrust",
)
dwtrustServerParser = ServerParser()
dwtrustClientParser = ClientParser()
