"""What an analysed scan leaves behind: the ScanResult value, the HyperSpy-readable results file
(writer, reader, format) and the pictures."""
