using System.Buffers;
using System.IO.MemoryMappedFiles;

namespace DmaBroker.Client;

/// <summary>
/// The client's mapping of one shared block (SPEC §15): <c>[offset, offset+size)</c> of the
/// session's file under /dev/shm, mapped read/write and shared, so that the CPU's loads and stores
/// and the device's DMA meet in the same pages. A <see cref="MemoryManager{T}"/>, so a
/// <see cref="Memory{T}"/> can point straight at it.
/// </summary>
internal sealed unsafe class SharedMapping : MemoryManager<byte>
{
    private readonly MemoryMappedFile _file;
    private readonly MemoryMappedViewAccessor _view;
    private readonly int _length;
    private byte* _pointer;
    private int _disposed;

    private SharedMapping(MemoryMappedFile file, MemoryMappedViewAccessor view, int length)
    {
        _file = file;
        _view = view;
        _length = length;
        byte* pointer = null;
        view.SafeMemoryMappedViewHandle.AcquirePointer(ref pointer);
        _pointer = pointer + view.PointerOffset;
    }

    /// <summary>Maps <paramref name="size"/> bytes at <paramref name="offset"/> of the file at <paramref name="path"/>.</summary>
    public static SharedMapping Open(string path, ulong offset, ulong size)
    {
        if (size > int.MaxValue)
            throw new NotSupportedException($"a shared buffer of {size} bytes is larger than one Span can cover");
        // FileShare.ReadWrite: no advisory lock, since several buffers of a session map the same file.
        var stream = new FileStream(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite | FileShare.Delete);
        MemoryMappedFile? file = null;
        try
        {
            file = MemoryMappedFile.CreateFromFile(stream, null, 0, MemoryMappedFileAccess.ReadWrite, HandleInheritability.None, leaveOpen: false);
            var view = file.CreateViewAccessor((long)offset, (long)size, MemoryMappedFileAccess.ReadWrite);
            return new SharedMapping(file, view, (int)size);
        }
        catch
        {
            if (file is null)
                stream.Dispose();
            else
                file.Dispose();
            throw;
        }
    }

    /// <summary>Whether the mapping is still in place.</summary>
    public bool IsMapped => _pointer != null;

    /// <inheritdoc/>
    public override Span<byte> GetSpan()
    {
        var pointer = _pointer;
        ObjectDisposedException.ThrowIf(pointer == null, this);
        return new Span<byte>(pointer, _length);
    }

    /// <summary>The mapping stays put while mapped, so pinning is a no-op.</summary>
    public override MemoryHandle Pin(int elementIndex = 0)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(elementIndex);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(elementIndex, _length);
        var pointer = _pointer;
        ObjectDisposedException.ThrowIf(pointer == null, this);
        return new MemoryHandle(pointer + elementIndex);
    }

    /// <inheritdoc/>
    public override void Unpin()
    {
    }

    /// <summary>Unmaps: any span or memory taken from it must not be used any more.</summary>
    protected override void Dispose(bool disposing)
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        _pointer = null;
        _view.SafeMemoryMappedViewHandle.ReleasePointer();
        _view.Dispose();
        _file.Dispose();
    }
}
