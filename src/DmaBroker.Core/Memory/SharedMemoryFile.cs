using System.Runtime.InteropServices;
using System.Security.Cryptography;

namespace DmaBroker.Core.Memory;

/// <summary>
/// A session's shared-memory file (SPEC §15): one sparse file under /dev/shm, mode 0600, owned by
/// the client's uid, mapped once into the broker, in which the session's shared blocks are
/// carved at page-aligned offsets. The client maps the same pages, so its CPU view and the
/// device's DMA meet in memory with no bytes on the wire.
/// </summary>
/// <remarks>
/// Its free list is guarded by the owning <see cref="SessionMemory"/>'s lock. The mapping is
/// dropped only by <see cref="Dispose()"/>, at session teardown, after every IOMMU mapping of the
/// session's memory is gone (so no device access can still hold a span onto it) and the session
/// admits no more calls.
/// </remarks>
internal sealed unsafe partial class SharedMemoryFile : IDisposable
{
    /// <summary>Where the files live: tmpfs, so their pages are memory, never disk.</summary>
    public const string Directory = "/dev/shm";

    /// <summary>The prefix of every file's name; the rest is the broker's pid, the session id and 64 random bits.</summary>
    public const string NamePrefix = "dmabroker-";

    private const int ProtReadWrite = 0x1 | 0x2;
    private const int MapShared = 0x01;
    private const int FallocKeepSize = 0x01;
    private const int FallocPunchHole = 0x02;
    private const int Enospc = 28;
    private const int Eperm = 1;

    private readonly FileStream _file;
    private readonly List<(ulong Offset, ulong Size)> _free; // sorted by offset, adjacent runs merged
    private byte* _base;

    private SharedMemoryFile(string path, FileStream file, byte* @base, ulong capacity)
    {
        Path = path;
        _file = file;
        _base = @base;
        Capacity = capacity;
        _free = [(0, capacity)];
    }

    /// <summary>The file's absolute path, what Memory.Allocate returns as <c>shm_path</c>.</summary>
    public string Path { get; }

    /// <summary>The file's size: the address range blocks are carved from; sparse, so unused pages cost nothing.</summary>
    public ulong Capacity { get; }

    /// <summary>Whether the broker's mapping is still in place (false after <see cref="Dispose()"/>).</summary>
    public bool IsMapped => _base != null;

    /// <summary>
    /// Creates, sizes, hands to <paramref name="ownerUid"/> and maps a new file. EPERM when the
    /// broker may not give the file to that uid (it is not root and the uid is not its own); ENOMEM
    /// when it cannot be mapped; EIO for anything else. A failure leaves no file behind.
    /// </summary>
    public static SharedMemoryFile Create(ulong sessionId, ulong capacity, uint ownerUid)
    {
        if (!OperatingSystem.IsLinux())
            throw ErrnoException.Invalid("shared session memory needs Linux (/dev/shm)");
        // pid + session id keep two brokers' and two sessions' files apart; the random part keeps a
        // restarted broker that reuses a pid from ever opening a stale file (O_EXCL refuses it anyway).
        var path = System.IO.Path.Combine(Directory, $"{NamePrefix}{Environment.ProcessId}-s{sessionId}-{Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(8))}");
        FileStream file;
        try
        {
            file = new FileStream(path, new FileStreamOptions
            {
                Mode = FileMode.CreateNew, // O_CREAT | O_EXCL: never someone else's file
                Access = FileAccess.ReadWrite,
                Share = FileShare.ReadWrite, // the client opens it too; no advisory lock
                UnixCreateMode = UnixFileMode.UserRead | UnixFileMode.UserWrite,
            });
        }
        catch (IOException e)
        {
            throw ErrnoException.Conflict(Errno.EIO, $"cannot create {path}: {e.Message}");
        }
        catch (UnauthorizedAccessException e)
        {
            throw ErrnoException.Conflict(Errno.EIO, $"cannot create {path}: {e.Message}");
        }
        try
        {
            var fd = (int)file.SafeFileHandle.DangerousGetHandle();
            // Group -1: unchanged; mode 0600 gives the group nothing anyway.
            if (FChown(fd, ownerUid, uint.MaxValue) != 0)
            {
                var errno = Marshal.GetLastPInvokeError();
                throw errno == Eperm
                    ? ErrnoException.NotPermitted($"the broker may not give {path} to uid {ownerUid}: only root can give a file to another user; run the broker as root or as that user")
                    : ErrnoException.Conflict(Errno.EIO, $"fchown of {path} to uid {ownerUid} failed with errno {errno}");
            }
            file.SetLength(checked((long)capacity)); // ftruncate: sparse, no page is allocated yet
            var mapped = Mmap(null, (nuint)capacity, ProtReadWrite, MapShared, fd, 0);
            if (mapped == (void*)-1)
                throw ErrnoException.Exhausted(Errno.ENOMEM, $"cannot map {capacity} bytes of {path}: errno {Marshal.GetLastPInvokeError()}");
            return new SharedMemoryFile(path, file, (byte*)mapped, capacity);
        }
        catch
        {
            file.Dispose();
            File.Delete(path);
            throw;
        }
    }

    /// <summary>
    /// Removes the files of brokers that no longer run (killed before their sessions' teardown could
    /// unlink them), so their pages go back to the system: a file whose name's pid has no process.
    /// A file of a live process, this one's included, is never touched. Returns how many went.
    /// </summary>
    public static int RemoveOrphans()
    {
        if (!OperatingSystem.IsLinux() || !System.IO.Directory.Exists(Directory))
            return 0;
        var removed = 0;
        foreach (var path in System.IO.Directory.EnumerateFiles(Directory, NamePrefix + "*"))
        {
            var name = System.IO.Path.GetFileName(path.AsSpan())[NamePrefix.Length..];
            var dash = name.IndexOf('-');
            if (dash <= 0 || !int.TryParse(name[..dash], System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out var pid)
                || pid == Environment.ProcessId || System.IO.Directory.Exists($"/proc/{pid}"))
                continue;
            try
            {
                File.Delete(path);
                removed++;
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // Someone else's file we may not remove, or gone already: not ours to worry about.
            }
        }
        return removed;
    }

    /// <summary>
    /// Carves <paramref name="size"/> bytes (whole pages) out of the file, zeroed and backed:
    /// their pages are allocated in /dev/shm now, so neither the broker nor the client can meet
    /// SIGBUS on a full tmpfs later. ENOMEM when no free run is large enough or /dev/shm is full.
    /// </summary>
    public ulong Reserve(ulong size)
    {
        var index = _free.FindIndex(run => run.Size >= size);
        if (index < 0)
            throw ErrnoException.Exhausted(Errno.ENOMEM, $"no free run of {size} bytes left in the session's shared file ({Capacity} bytes)");
        var (offset, runSize) = _free[index];
        // Punch first: a client that wrote after freeing these pages must not leak its bytes into a new block.
        Punch(offset, size);
        if (Fallocate(Fd, 0, (long)offset, (long)size) != 0)
        {
            var errno = Marshal.GetLastPInvokeError();
            Punch(offset, size);
            throw errno == Enospc
                ? ErrnoException.Exhausted(Errno.ENOMEM, $"/dev/shm has no room for {size} more bytes")
                : ErrnoException.Conflict(Errno.EIO, $"fallocate of {size} bytes in {Path} failed with errno {errno}");
        }
        if (runSize == size)
            _free.RemoveAt(index);
        else
            _free[index] = (offset + size, runSize - size);
        return offset;
    }

    /// <summary>Gives a block's pages back to the system (punched out of the file) and its range back to the free list.</summary>
    public void Release(ulong offset, ulong size)
    {
        Punch(offset, size);
        var index = _free.FindIndex(run => run.Offset > offset);
        if (index < 0)
            index = _free.Count;
        _free.Insert(index, (offset, size));
        // Merge with the next run, then with the previous one.
        if (index + 1 < _free.Count && _free[index].Offset + _free[index].Size == _free[index + 1].Offset)
        {
            _free[index] = (_free[index].Offset, _free[index].Size + _free[index + 1].Size);
            _free.RemoveAt(index + 1);
        }
        if (index > 0 && _free[index - 1].Offset + _free[index - 1].Size == _free[index].Offset)
        {
            _free[index - 1] = (_free[index - 1].Offset, _free[index - 1].Size + _free[index].Size);
            _free.RemoveAt(index);
        }
    }

    /// <summary>A span onto <c>[offset, offset+length)</c> of the broker's mapping; the caller has checked the range.</summary>
    public Span<byte> Span(ulong offset, int length)
    {
        var mapped = _base;
        if (mapped == null)
            throw new ObjectDisposedException(Path, "the session's shared memory is already unmapped");
        return new Span<byte>(mapped + offset, length);
    }

    /// <summary>Unlinks the file and drops the broker's mapping; the client's own mapping stays valid until it unmaps.</summary>
    public void Dispose() => Dispose(unmap: true);

    /// <summary>
    /// Unlinks the file; drops the broker's mapping only when <paramref name="unmap"/> (a caller that
    /// cannot prove no span onto it is still in use keeps it mapped: a leak, never a crash).
    /// </summary>
    public void Dispose(bool unmap)
    {
        File.Delete(Path);
        if (!unmap || _base == null)
            return;
        _ = Munmap(_base, (nuint)Capacity);
        _base = null;
        _file.Dispose();
    }

    private int Fd => (int)_file.SafeFileHandle.DangerousGetHandle();

    private void Punch(ulong offset, ulong size)
    {
        if (Fallocate(Fd, FallocPunchHole | FallocKeepSize, (long)offset, (long)size) != 0)
            throw ErrnoException.Conflict(Errno.EIO, $"cannot release {size} bytes of {Path}: errno {Marshal.GetLastPInvokeError()}");
    }

    [LibraryImport("libc", EntryPoint = "fchown", SetLastError = true)]
    private static partial int FChown(int fd, uint owner, uint group);

    [LibraryImport("libc", EntryPoint = "mmap", SetLastError = true)]
    private static partial void* Mmap(void* address, nuint length, int protection, int flags, int fd, long offset);

    [LibraryImport("libc", EntryPoint = "munmap", SetLastError = true)]
    private static partial int Munmap(void* address, nuint length);

    [LibraryImport("libc", EntryPoint = "fallocate", SetLastError = true)]
    private static partial int Fallocate(int fd, int mode, long offset, long length);
}
