"""How `TritonServer.stop` reads the exit of a tritonserver that ran out of its exit timeout.

The excerpts are what the bundled Triton 2.51 wrote after SIGTERM (2026-12-06, this machine),
shortened where marked: one run where a gRPC client was killed mid-request and two models were
never released, one where a request was still running when the timeout expired.
"""

from headmaster.model_repository.server import _only_references_outlived

# A client killed mid-request: every inference finished, two model references never went.
REFERENCES_OUTLIVED = """\
Signal (15) received.
I1206 02:39:19.875362 14736 server.cc:305] "Waiting for in-flight requests to complete."
I1206 02:39:19.875393 14736 server.cc:321] "Timeout 10: Found 0 model versions that have in-flight inferences"
I1206 02:39:19.875405 14736 server.cc:336] "All models are stopped, unloading models"
I1206 02:39:19.875417 14736 server.cc:345] "Timeout 10: Found 8 live models and 0 in-flight non-inference requests"
...
I1206 02:39:28.879285 14736 server.cc:345] "Timeout 1: Found 2 live models and 0 in-flight non-inference requests"
I1206 02:39:29.879533 14736 server.cc:345] "Timeout 0: Found 2 live models and 0 in-flight non-inference requests"
E1206 02:39:29.879603 14736 main.cc:535] "failed to stop server: Internal - Exit timeout expired. Exiting immediately."
"""

# SIGTERM with no drain under a 1,200-image request: inferences still running at the timeout.
REQUESTS_CUT = """\
Signal (15) received.
I1206 02:40:19.376041 15348 server.cc:305] "Waiting for in-flight requests to complete."
I1206 02:40:19.376098 15348 server.cc:321] "Timeout 10: Found 2 model versions that have in-flight inferences"
I1206 02:40:19.376102 15348 server.cc:325] "Model 'classify' (version 1) has 8 in-flight inferences"
I1206 02:40:19.376107 15348 server.cc:325] "Model 'image_encoder' (version 1) has 4 in-flight inferences"
...
I1206 02:40:29.378210 15348 server.cc:321] "Timeout 0: Found 2 model versions that have in-flight inferences"
I1206 02:40:29.378267 15348 server.cc:325] "Model 'classify' (version 1) has 6 in-flight inferences"
I1206 02:40:29.378274 15348 server.cc:325] "Model 'image_encoder' (version 1) has 4 in-flight inferences"
E1206 02:40:29.378289 15348 main.cc:535] "failed to stop server: Internal - Exit timeout expired. Exiting immediately."
"""


def test_a_timeout_on_unloading_alone_loses_no_request():
    assert _only_references_outlived(REFERENCES_OUTLIVED)


def test_a_timeout_with_inferences_in_flight_is_a_loss():
    assert not _only_references_outlived(REQUESTS_CUT)


def test_a_model_load_or_other_call_still_in_flight_is_not_waved_through():
    busy = REFERENCES_OUTLIVED.replace("Timeout 0: Found 2 live models and 0 in-flight", "Timeout 0: Found 2 live models and 1 in-flight")
    assert not _only_references_outlived(busy)


def test_a_server_that_stopped_in_time_or_said_nothing_is_not_read_as_one():
    clean = REFERENCES_OUTLIVED.replace("Exit timeout expired", "")
    assert not _only_references_outlived(clean)
    assert not _only_references_outlived("")
