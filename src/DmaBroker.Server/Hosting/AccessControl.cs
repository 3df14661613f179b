using System.Security.Cryptography;
using DmaBroker.Core.Access;

namespace DmaBroker.Server.Hosting;

/// <summary>
/// The auth policy in force: open mode, or the auth file, reloaded whenever the file changes. A
/// file that does not parse is logged and ignored, and the policy before it stays in force. Each
/// call reads <see cref="Current"/> once, so a reload never changes the rules under a call.
/// </summary>
public sealed partial class AccessControl : IDisposable
{
    private readonly string? _path;
    private readonly Quotas _defaults;
    private readonly ILogger _logger;
    private readonly FileSystemWatcher? _watcher;
    private readonly Lock _reload = new();
    private readonly ITimer? _settle;
    private AccessPolicy _current;
    private byte[] _loadedHash = [];
    private long _reloads;

    /// <summary>Open mode when <paramref name="authFile"/> is null; otherwise the file, which must parse now.</summary>
    public AccessControl(string? authFile, Quotas defaults, Quotas openQuotas, ILogger<AccessControl> logger, TimeProvider? time = null)
    {
        _defaults = defaults;
        _logger = logger;
        if (authFile is null)
        {
            _current = AccessPolicy.Open(openQuotas);
            return;
        }
        _path = Path.GetFullPath(authFile);
        var text = Read(_path);
        _current = AccessPolicy.Parse(text, defaults, _path);
        _loadedHash = Hash(text);
        // Editors and config managers replace files by rename: watch the directory for the name.
        _watcher = new FileSystemWatcher(Path.GetDirectoryName(_path)!, Path.GetFileName(_path))
        {
            NotifyFilter = NotifyFilters.LastWrite | NotifyFilters.FileName | NotifyFilters.Size | NotifyFilters.CreationTime,
        };
        // A write in place raises several events, the first while the file is half written: each
        // event restarts a short settle timer, and the file is read once it has been quiet.
        _settle = (time ?? TimeProvider.System).CreateTimer(static s => ((AccessControl)s!).Reload(), this, Timeout.InfiniteTimeSpan, Timeout.InfiniteTimeSpan);
        _watcher.Changed += (_, _) => Settle();
        _watcher.Created += (_, _) => Settle();
        _watcher.Renamed += (_, _) => Settle();
        _watcher.EnableRaisingEvents = true;
    }

    /// <summary>The policy in force.</summary>
    public AccessPolicy Current => Volatile.Read(ref _current);

    /// <summary>The auth file's full path, or null in open mode.</summary>
    public string? AuthFile => _path;

    /// <summary>How many times a changed file was taken into force.</summary>
    public long Reloads => Interlocked.Read(ref _reloads);

    /// <summary>Raised after a changed file is in force, or after a bad one was refused (with its error).</summary>
    public event Action<AccessPolicy, string?>? Reloaded;

    /// <summary>How long the file must be quiet after a change before it is read.</summary>
    public static readonly TimeSpan SettleTime = TimeSpan.FromMilliseconds(250);

    private void Settle() => _settle?.Change(SettleTime, Timeout.InfiniteTimeSpan);

    /// <summary>Reads the file again; takes it into force when it changed and parses, else logs why not.</summary>
    public void Reload()
    {
        if (_path is null)
            return;
        lock (_reload)
        {
            string text;
            try
            {
                text = Read(_path);
            }
            catch (AccessPolicyException e)
            {
                // Mid-replace the file may be briefly missing; the next event brings it back.
                LogReloadFailed(_logger, e.Message);
                Reloaded?.Invoke(Current, e.Message);
                return;
            }
            var hash = Hash(text);
            if (hash.AsSpan().SequenceEqual(_loadedHash))
                return;
            try
            {
                var policy = AccessPolicy.Parse(text, _defaults, _path);
                _loadedHash = hash;
                Volatile.Write(ref _current, policy);
                Interlocked.Increment(ref _reloads);
                LogReloaded(_logger, _path, policy.Count);
                Reloaded?.Invoke(policy, null);
            }
            catch (AccessPolicyException e)
            {
                _loadedHash = hash;
                LogReloadFailed(_logger, e.Message);
                Reloaded?.Invoke(Current, e.Message);
            }
        }
    }

    /// <summary>Stops watching the file.</summary>
    public void Dispose()
    {
        _watcher?.Dispose();
        _settle?.Dispose();
    }

    private static string Read(string path)
    {
        try
        {
            return File.ReadAllText(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new AccessPolicyException($"cannot read auth file {path}: {e.Message}");
        }
    }

    private static byte[] Hash(string text) => SHA256.HashData(System.Text.Encoding.UTF8.GetBytes(text));

    [LoggerMessage(EventId = 300, EventName = "AuthFileReloaded", Level = LogLevel.Information, Message = "auth file {Path} reloaded: {Count} principal entries")]
    private static partial void LogReloaded(ILogger logger, string path, int count);

    [LoggerMessage(EventId = 301, EventName = "AuthFileRejected", Level = LogLevel.Error, Message = "auth file not reloaded, the previous one stays in force: {Reason}")]
    private static partial void LogReloadFailed(ILogger logger, string reason);
}
