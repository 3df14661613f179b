namespace DmaBroker.Core.Devices;

/// <summary>
/// The one namespace of an <see cref="NvmeController"/>: 512-byte LBAs, stored sparsely in 4 KiB
/// chunks, so a 64 MiB (or 1 TiB) namespace costs only what has been written. A chunk never
/// written reads as zeros. The media survives controller and function-level resets, as a disk's does.
/// </summary>
internal sealed class NvmeNamespace
{
    public const int BlockSize = 512;
    public const int ChunkSize = 4096;

    private readonly Dictionary<ulong, byte[]> _chunks = [];

    public NvmeNamespace(ulong sizeBytes)
    {
        SizeBytes = sizeBytes;
        Blocks = sizeBytes / BlockSize;
    }

    public ulong SizeBytes { get; }

    /// <summary>The namespace size in LBAs (Identify Namespace NSZE).</summary>
    public ulong Blocks { get; }

    /// <summary>How many 4 KiB chunks hold data, for tests that check the storage stays sparse.</summary>
    public int ChunkCount => _chunks.Count;

    /// <summary>Reads <paramref name="destination"/>.Length bytes from byte <paramref name="offset"/>; the caller has checked the range.</summary>
    public void Read(ulong offset, Span<byte> destination)
    {
        while (!destination.IsEmpty)
        {
            var (chunk, within, length) = Slice(offset, destination.Length);
            if (_chunks.TryGetValue(chunk, out var bytes))
                bytes.AsSpan(within, length).CopyTo(destination);
            else
                destination[..length].Clear();
            destination = destination[length..];
            offset += (ulong)length;
        }
    }

    /// <summary>Writes <paramref name="source"/> at byte <paramref name="offset"/>; the caller has checked the range.</summary>
    public void Write(ulong offset, ReadOnlySpan<byte> source)
    {
        while (!source.IsEmpty)
        {
            var (chunk, within, length) = Slice(offset, source.Length);
            if (!_chunks.TryGetValue(chunk, out var bytes))
                _chunks[chunk] = bytes = new byte[ChunkSize];
            source[..length].CopyTo(bytes.AsSpan(within, length));
            source = source[length..];
            offset += (ulong)length;
        }
    }

    private static (ulong Chunk, int Within, int Length) Slice(ulong offset, int remaining)
    {
        var within = (int)(offset % ChunkSize);
        return (offset / ChunkSize, within, Math.Min(remaining, ChunkSize - within));
    }
}
